"""Elastic restarts under torchrun: a restarted group continues its own run.

torchrun (torch.distributed.run, "torchelastic") restarts every worker of the group when one of
them fails, up to `--max-restarts` times, with the same command line; TORCHELASTIC_RESTART_COUNT
tells the workers which attempt this is. Unchanged, `podium train ... run.dir=DIR` would then stop
at "run.dir already holds a run". The rule podium follows:

    Under torchrun, `podium train` whose run.dir holds checkpoints/last.pt resumes that run
    (as `resume=DIR` would) when TORCHELASTIC_RESTART_COUNT > 0 and the run was started by this
    same torchrun job: one of the job's agents (the torchrun process that launched a worker,
    named by host and process id) is among those that RUN/torchelastic.json recorded when the run
    started.

So a restart loses at most one checkpoint interval (the epoch end, or `trainer.checkpoint_every_n_steps`
/ `_minutes`), while a new torchrun pointed at a folder that holds an older run is still refused
(exit 2) on every attempt, never silently continued. A restart before the first checkpoint starts
the run over in the same folder (and continues its MLflow run, through tracking.json). Without
run.dir each attempt would make a new timestamped folder, so podium warns when torchrun may restart.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes 1:2 --nproc-per-node 2 --max-restarts 1 \
      --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29500 \
      -m podium train experiment=digits trainer.accelerator=cpu run.dir=runs/x

Under torchrun the layout is torchrun's too (`torchrun_layout`): trainer.devices / num_nodes give
way to LOCAL_WORLD_SIZE and WORLD_SIZE, which an elastic restart may change.

The job's identity is the set of agents because torchrun offers no other: `--rdzv-id` defaults to
"none" for every job, and after a restart rank 0 may sit on another node than before.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from omegaconf import open_dict

from podium.errors import UserError

MARKER = "torchelastic.json"

# Measured here (torch 2.14, gloo, 2 workers): with torchrun's default, the workers' store is the
# agent's rendezvous store, kept across restarts without a per-attempt prefix, so a restarted
# group can read the dead attempt's addresses and hang in init_process_group (pytorch/pytorch#135712):
# one of the first two restarts measured here hung there (killed after 4 minutes; gloo's own
# timeout is 30). Opting out gives each attempt a fresh store: 4 of 4 restarts then resumed.
SHARED_STORE_WARNING = (
    "[yellow]torchrun shares its rendezvous store with the workers (TORCHELASTIC_USE_AGENT_STORE=True): "
    "after a restart the new group can read the previous attempt's keys and hang while connecting "
    "(pytorch/pytorch#135712). Launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its "
    "environment so that each attempt gets a fresh store.")


def launched_by_torchelastic() -> bool:
    """torchrun sets TORCHELASTIC_RUN_ID in every worker (what torch and Lightning test too)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def torchrun_layout(tc, console) -> tuple[int, int] | None:
    """(processes per node, nodes) of this torchrun rendezvous, or None outside torchrun.

    Under torchrun the launcher decides the layout, not trainer.devices / trainer.num_nodes:
    with `--nnodes 1:2` a restart may bring one node or two, and Lightning refuses a product
    devices x num_nodes that differs from WORLD_SIZE. So the config of a one-process run works
    unchanged; a layout the config spelt differently is noted, and environment.json records the
    devices each attempt ran on."""
    if not launched_by_torchelastic() or "LOCAL_WORLD_SIZE" not in os.environ:
        return None
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    nodes = max(1, int(os.environ.get("WORLD_SIZE", per_node)) // per_node)
    asked = (tc.devices, tc.num_nodes)
    if asked not in ((1, 1), (per_node, nodes)) and os.environ.get("RANK", "0") == "0":
        console.print(f"torchrun runs {per_node} process(es) on each of {nodes} node(s): "
                      f"trainer.devices={tc.devices} trainer.num_nodes={tc.num_nodes} give way to it.",
                      highlight=False)
    return per_node, nodes


def restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def agent_id() -> str:
    """This worker's agent: the torchrun process that started it (its parent), on this host."""
    return f"{socket.gethostname()}:{os.getppid()}"


def _gather_agents(fabric) -> list[str]:
    import torch.distributed as dist

    if fabric.world_size <= 1 or not dist.is_initialized():
        return [agent_id()]
    agents: list = [None] * fabric.world_size
    dist.all_gather_object(agents, agent_id())
    return sorted(set(agents))


def _decide(cfg, run_dir: Path, agents: list[str]) -> tuple[str, str]:
    """On rank 0: ("resume", why) / ("new", "") / ("error", message)."""
    from podium.engine.resume import check_resume_overrides
    from podium.engine.runconfig import load_run_config

    last = run_dir / "checkpoints" / "last.pt"
    marker = run_dir / MARKER
    if not last.is_file():
        # a fresh start (or a restart before the first checkpoint): this job owns the folder
        run_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"agents": agents, "run_id": os.environ.get("TORCHELASTIC_RUN_ID")},
                                     indent=2) + "\n")
        return "new", ""
    if restart_count() == 0:
        return "new", ""  # the session refuses the used run.dir with its usual message
    try:
        started_by = set(json.loads(marker.read_text()).get("agents", []))
    except (OSError, ValueError, AttributeError):
        started_by = set()
    if not started_by & set(agents):
        return "error", (f"run.dir={run_dir} already holds a run that this torchrun job did not start "
                         f"({marker.name} names agents {sorted(started_by) or 'none'}, this job's are "
                         f"{agents}); continue it with `podium train resume={run_dir}` or choose another run.dir.")
    stored = load_run_config(run_dir, [])
    requested = cfg.copy()
    with open_dict(requested):
        requested.run.dir = stored.run.dir  # the folder is this run's; how its path is spelt is not a change
    try:
        check_resume_overrides(run_dir, stored, requested)
    except UserError as err:
        return "error", f"elastic restart (attempt {restart_count()}): {err}"
    return "resume", f"torchrun restart {restart_count()}: resuming {last}"


def resume_dir_after_restart(fabric, cfg, console) -> Path | None:
    """The run folder to resume after a torchrun restart, or None for a new run; writes the
    marker on a new run under torchrun. Every rank must call it (it gathers and broadcasts)."""
    if not launched_by_torchelastic():
        return None
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if fabric.global_rank == 0 and restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        console.print(SHARED_STORE_WARNING)
    if not cfg.run.dir:
        if fabric.global_rank == 0 and restarts > 0:
            console.print("[yellow]torchrun may restart this group (--max-restarts) but run.dir is not set: "
                          "a restart would start over in a new folder. Give run.dir=... (on a filesystem "
                          "every node sees) to resume from the last checkpoint instead.")
        return None
    run_dir = Path(cfg.run.dir)
    agents = _gather_agents(fabric)
    decision = _decide(cfg, run_dir, agents) if fabric.global_rank == 0 else None
    kind, text = fabric.broadcast(decision, src=0)
    if kind == "error":
        raise UserError(text)
    if kind != "resume":
        return None
    if fabric.global_rank == 0:
        console.print(text, highlight=False)
    return run_dir
