"""Training under torchrun with elastic restarts: two gloo workers on loopback stand in for
two machines (engine/elastic.py has the rule).

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/engine/test_torchrun.py

The end-to-end tests launch `python -m torch.distributed.run` (what the `torchrun` script runs)
with a c10d rendezvous on 127.0.0.1, `--nnodes 1:2` and `--max-restarts 1`, exactly as the README's
command; one of them SIGKILLs a worker from outside, found through torchrun's process tree.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import DIGITS_TINY

# Three epochs of 73 steps (8 samples per worker), a checkpoint at each epoch's end: long enough
# to kill a worker between the first checkpoint and the end, short enough for the suite. No
# trainer.devices / num_nodes: the config of a one-process run, torchrun decides the layout.
CONFIG = [o for o in DIGITS_TINY if not o.startswith(("trainer.max_epochs", "tracking"))] + [
    "trainer.max_epochs=3", "trainer.batch_size=8", "trainer.accelerator=cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(run_dir: Path, cwd: Path, log: Path, *extra: str) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--max-restarts", "1",
           # with fewer nodes than the maximum (1 of 1:2) each rendezvous waits this long for more
           # to join: 30 s by default, twice in the restart test
           "--rdzv-conf", "last_call_timeout=1",
           "-m", "podium", "train", *CONFIG, *extra, f"run.dir={run_dir}"]
    # a fresh rendezvous store for each attempt: with torchrun's shared one a restarted group
    # can hang connecting to the dead attempt's addresses (engine/elastic.py, SHARED_STORE_WARNING)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    # its own session, so that a failed test can end it (and its workers: see _stop)
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """End torchrun and its workers (they run in sessions of their own)."""
    for pid in _workers(proc.pid).values():
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            _stop(proc)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def _workers(agent_pid: int) -> dict[int, int]:
    """{RANK: pid} of the workers torchrun (`agent_pid`) started, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            env = dict(item.split("=", 1) for item in (entry / "environ").read_bytes().decode().split("\0") if "=" in item)
        except (OSError, ValueError, IndexError):
            continue  # the process ended meanwhile
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def _state(path: Path) -> dict | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["state"]
    except Exception:  # not written yet (atomic rename: never half a file)
        return None


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]


def _files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: one torchrun run that nothing interrupts."""
    root = tmp_path_factory.mktemp("torchrun-clean")
    proc = _torchrun(root / "run", root / "cwd", root / "log.txt", f"run.root={root / 'runs'}", "tracking=none")
    return root, _finish(proc, root / "log.txt")


@pytest.mark.slow
def test_torchrun_trains_like_podium_train_and_rank_zero_alone_writes(uninterrupted, digits_run):
    root, log = uninterrupted
    run = root / "run"
    # two workers shared each step: 1167 training digits / (2 x 8) = 73 steps per epoch
    history = (run / "history.csv").read_text().splitlines()
    assert [int(line.split(",")[1]) for line in history[1:]] == [73, 146, 219]
    env = json.loads((run / "environment.json").read_text())
    assert env["devices"] == ["cpu", "cpu"], env["devices"]
    # the same files as a single-process run of the same kind, plus the torchrun marker; no
    # second run folder, nothing in the working directory, no runs root made by another rank
    assert _files(run) == _files(digits_run) | {"torchelastic.json"}
    assert not any((root / "cwd").iterdir()) and not (root / "runs").exists()
    assert log.count("run folder:") == 2, log  # rank 0 alone prints (start and end)


@pytest.mark.slow
def test_worker_killed_mid_training_restarts_from_the_last_checkpoint(tmp_path, uninterrupted):
    run, log = tmp_path / "run", tmp_path / "log.txt"
    proc = _torchrun(run, tmp_path / "cwd", log, f"run.root={tmp_path / 'runs'}")  # MLflow on
    try:
        deadline, state = time.time() + 240, None
        while time.time() < deadline and proc.poll() is None:
            state = _state(run / "checkpoints" / "last.pt")
            if state and state["epoch"] >= 1:
                break
            time.sleep(0.01)
        assert state and state["epoch"] >= 1 and not state["finished"], (state, log.read_text()[-3000:])
        workers = _workers(proc.pid)
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGKILL)  # rank 1: torchrun stops rank 0 and restarts both
    except BaseException:
        _stop(proc)
        raise
    text = _finish(proc, log)
    assert "torchrun restart 1: resuming" in text, text[-3000:]
    env = json.loads((run / "environment.json").read_text())
    (resume,) = env["resumes"]
    # lost at most one checkpoint interval: resumed from the checkpoint seen before the kill
    # (or a later one that rank 0 wrote before torchrun stopped it), never from scratch
    assert state["step"] <= resume["resumed_at_step"] < state["step"] + 73, (state, resume)
    history = (run / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2", "3"]
    # the restarted workers end where the uninterrupted run ends, bit for bit (gloo sums two
    # ranks in a fixed order on CPU; the sampler, augmentation seeds and RNG are restored)
    reference = _weights(uninterrupted[0] / "run")
    weights = _weights(run)
    assert weights.keys() == reference.keys()
    for key in reference:
        assert torch.equal(weights[key], reference[key]), key
    # one MLflow run, continued by the restart (tracking.json), finished
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert mlflow_run.info.status == "FINISHED"
    assert len([p for p in (tmp_path / "runs").iterdir() if p.name != "mlartifacts"]) == 1  # mlflow.db


# --- the restart rule, without torchrun: a one-process "group" and the variables torchrun sets


class _OneProcess:
    world_size, global_rank = 1, 0

    @staticmethod
    def broadcast(obj, src=0):
        return obj


@pytest.fixture
def used_run(tmp_path, digits_run, monkeypatch):
    from podium.engine.runconfig import load_run_config

    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    cfg = load_run_config(run, [f"run.dir={run}"])  # as the copy's own command line would say
    return run, cfg


def _resume_dir(cfg, restart: int, monkeypatch):
    from rich.console import Console

    from podium.engine.elastic import resume_dir_after_restart

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restart))
    return resume_dir_after_restart(_OneProcess(), cfg, Console(file=open(os.devnull, "w")))


def test_a_restart_resumes_the_run_this_job_started(used_run, monkeypatch):
    from podium.engine.elastic import MARKER, agent_id

    run, cfg = used_run
    (run / MARKER).write_text(json.dumps({"agents": ["otherhost:1", agent_id()]}))
    assert _resume_dir(cfg, 1, monkeypatch) == run


def test_a_new_torchrun_never_continues_an_older_run_in_its_run_dir(used_run, monkeypatch):
    from podium.engine.elastic import MARKER
    from podium.errors import UserError

    run, cfg = used_run
    assert _resume_dir(cfg, 0, monkeypatch) is None  # attempt 0: the usual "already holds a run"
    assert not (run / MARKER).exists()  # and the old run's folder is not claimed
    with pytest.raises(UserError, match="did not start"):  # a restart of that job: still refused
        _resume_dir(cfg, 1, monkeypatch)
    (run / MARKER).write_text(json.dumps({"agents": ["otherhost:1"]}))  # an earlier torchrun job
    with pytest.raises(UserError, match="did not start"):
        _resume_dir(cfg, 1, monkeypatch)


def test_a_restart_with_another_config_is_refused(used_run, monkeypatch):
    from omegaconf import open_dict

    from podium.engine.elastic import MARKER, agent_id
    from podium.errors import UserError

    run, cfg = used_run
    (run / MARKER).write_text(json.dumps({"agents": [agent_id()]}))
    with open_dict(cfg):
        cfg.optim.lr = 0.5
    with pytest.raises(UserError, match="optim.lr"):
        _resume_dir(cfg, 1, monkeypatch)


def test_a_new_run_under_torchrun_records_its_agents(tmp_path, used_run, monkeypatch):
    from omegaconf import open_dict

    from podium.engine.elastic import MARKER, agent_id

    _, cfg = used_run
    with open_dict(cfg):
        cfg.run.dir = str(tmp_path / "fresh")
    assert _resume_dir(cfg, 0, monkeypatch) is None
    assert json.loads((tmp_path / "fresh" / MARKER).read_text())["agents"] == [agent_id()]
    # a restart before the first checkpoint starts over in the same folder
    assert _resume_dir(cfg, 1, monkeypatch) is None


def test_torchrun_decides_the_layout_whatever_the_config_says(monkeypatch):
    """With --nnodes 1:2 a restart may bring one node or two: devices x num_nodes must follow
    WORLD_SIZE (Lightning refuses a mismatch), so torchrun's numbers win over the config's."""
    import io

    from omegaconf import OmegaConf
    from rich.console import Console

    from podium.engine.elastic import torchrun_layout

    tc = OmegaConf.create({"devices": 4, "num_nodes": 2})
    out = io.StringIO()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert torchrun_layout(tc, Console(file=out)) is None  # not under torchrun: the config rules
    for name, value in {"TORCHELASTIC_RUN_ID": "none", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2", "RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    assert torchrun_layout(tc, Console(file=out)) == (2, 1)  # one node left after a restart
    assert "trainer.devices=4 trainer.num_nodes=2 give way" in " ".join(out.getvalue().split())
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert torchrun_layout(tc, Console(file=out)) == (2, 2)


def test_torchrun_sharing_its_store_with_the_workers_is_warned_about(used_run, monkeypatch):
    import io

    from rich.console import Console

    from podium.engine.elastic import resume_dir_after_restart

    _, cfg = used_run
    out = io.StringIO()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert resume_dir_after_restart(_OneProcess(), cfg, Console(file=out)) is None
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in " ".join(out.getvalue().split())
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what the variable gives
    out.truncate(0)
    resume_dir_after_restart(_OneProcess(), cfg, Console(file=out))
    assert "TORCH_DISABLE_SHARE" not in out.getvalue()
