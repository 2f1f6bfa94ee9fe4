"""`podium doctor`: check the environment and the data setup before a long run.

The two problems this catches most often cost hours otherwise:

* the wrong torch wheel: a CPU-only (or too new CUDA) build on a GPU machine silently trains on
  the CPU, 10-50x slower;
* the data loader as the bottleneck: the right `num_workers` depends on the machine, so it is
  measured rather than guessed.

Everything here is a plain function returning data; the CLI command (elsewhere) wires them
together and `render_report` prints the result.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
import time
from typing import Any, Callable, Iterable, Mapping, Optional

# pip's fix for a CPU-only wheel; cu126 is the current default CUDA of the PyTorch wheels.
CUDA_INDEX_URL = "https://download.pytorch.org/whl/cu126"
REINSTALL_HINT = f"pip install --force-reinstall torch --index-url {CUDA_INDEX_URL}"

# Data-config keys whose string values are local paths (matched on the key's ending).
PATH_KEY_SUFFIXES = ("root", "path", "dir", "csv", "file", "folder")

# A worker count within this share of the best throughput is "as good": fewer workers use less
# memory (each holds a copy of the dataset object) and start faster.
WORKERS_TOLERANCE = 0.05


# -- environment -------------------------------------------------------------------------------


def torch_build_report() -> dict[str, Any]:
    """What this torch build supports and what it can see on this machine."""
    import torch  # lazy: the CLI imports this module for --help too

    cuda_available = bool(torch.cuda.is_available())
    try:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # noqa: BLE001 - a broken cuDNN install is reported as "none"
        cudnn = None
    devices: list[str] = []
    capabilities: list[str] = []
    if cuda_available:
        for index in range(torch.cuda.device_count()):
            devices.append(torch.cuda.get_device_name(index))
            major, minor = torch.cuda.get_device_capability(index)
            capabilities.append(f"sm_{major}{minor}")
    try:
        arch_list = list(torch.cuda.get_arch_list()) if torch.version.cuda else []
    except Exception:  # noqa: BLE001
        arch_list = []
    mps = getattr(torch.backends, "mps", None)
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,  # None: a CPU-only (or ROCm) build
        "hip": getattr(torch.version, "hip", None),
        "cudnn": cudnn,
        "cuda_available": cuda_available,
        "device_count": len(devices),
        "devices": devices,
        "device_capabilities": capabilities,
        "cuda_arch_list": arch_list,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "mps_available": bool(mps is not None and mps.is_available()),
        "cpu_count": os.cpu_count() or 1,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def nvidia_smi_gpus() -> list[str]:
    """Names of the NVIDIA GPUs the driver sees, independent of torch; [] if none or no driver."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        result = subprocess.run(
            [exe, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if result.returncode != 0:
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def _arch_supported(capability: str, arch_list: list[str]) -> bool:
    """Whether kernels in `arch_list` run on a GPU of `capability` ("sm_86").

    A cubin for sm_XY runs on the same major version with minor >= Y; PTX (compute_XY) is
    compiled at load time for any GPU >= XY.
    """
    def number(arch: str) -> Optional[tuple[int, int]]:
        digits = arch.split("_", 1)[-1].rstrip("af")
        if not digits.isdigit() or len(digits) < 2:
            return None
        return int(digits[:-1]), int(digits[-1])

    gpu = number(capability)
    if gpu is None or not arch_list:
        return True  # can't tell: don't cry wolf
    for arch in arch_list:
        built = number(arch)
        if built is None:
            continue
        if arch.startswith("sm_") and built[0] == gpu[0] and built[1] <= gpu[1]:
            return True
        if arch.startswith("compute_") and built <= gpu:
            return True
    return False


def gpu_build_problems(report: Mapping[str, Any], smi_gpus: list[str]) -> list[str]:
    """Loud, actionable messages for a torch build that can't use the GPUs present; [] if fine."""
    problems: list[str] = []
    gpus = ", ".join(smi_gpus)
    if smi_gpus and not report.get("cuda"):
        problems.append(
            f"nvidia-smi sees {len(smi_gpus)} GPU(s) ({gpus}) but torch {report.get('torch')} "
            "is not a CUDA build, so training would run on the CPU. Reinstall a CUDA build "
            "matching your driver: run `nvidia-smi` and read the 'CUDA Version' in its header "
            "(the newest CUDA the driver supports), then e.g. "
            f"`{REINSTALL_HINT}` (use cu118 / cu124 / cu126 / cu128 to match; see "
            "https://pytorch.org/get-started/locally/)."
        )
    elif smi_gpus and not report.get("cuda_available"):
        visible = report.get("cuda_visible_devices")
        visible_note = (
            f" CUDA_VISIBLE_DEVICES is set to {visible!r}; unset it or list valid GPU ids."
            if visible is not None
            else ""
        )
        problems.append(
            f"nvidia-smi sees {len(smi_gpus)} GPU(s) ({gpus}) and torch {report.get('torch')} is "
            f"built for CUDA {report.get('cuda')}, but torch.cuda.is_available() is False. "
            "Usually the NVIDIA driver is too old for this CUDA version: compare the 'CUDA "
            "Version' in `nvidia-smi`'s header with it, then update the driver or install a "
            f"torch build for an older CUDA (e.g. `{REINSTALL_HINT}` with the matching cuXXX)."
            + visible_note
        )
    if report.get("cuda_available"):
        arch_list = list(report.get("cuda_arch_list") or [])
        names = list(report.get("devices") or [])
        for index, capability in enumerate(report.get("device_capabilities") or []):
            if not _arch_supported(capability, arch_list):
                name = names[index] if index < len(names) else f"cuda:{index}"
                problems.append(
                    f"GPU {index} ({name}, {capability}) is newer than this torch build supports "
                    f"(built for {' '.join(arch_list)}); CUDA kernels will fail to launch. "
                    "Install a torch build for a newer CUDA, e.g. `pip install --force-reinstall "
                    "torch --index-url https://download.pytorch.org/whl/cu128`."
                )
    return problems


# -- data loader timing ------------------------------------------------------------------------


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the first dimension of the batch, or of its first element."""
    while True:
        shape = getattr(batch, "shape", None)
        if shape is not None and len(shape) > 0:
            return int(shape[0])
        if isinstance(batch, Mapping) and batch:
            batch = next(iter(batch.values()))
        elif isinstance(batch, (list, tuple)) and batch:
            batch = batch[0]
        else:
            return 1


def time_loader(
    make_loader: Callable[[int], Iterable],
    worker_counts: list[int],
    n_batches: int = 20,
    warmup: int = 2,
) -> list[dict[str, Any]]:
    """Throughput of `make_loader(num_workers)` for each worker count.

    The first `warmup` batches are skipped (they include starting the worker processes), then
    the next `n_batches` (fewer if the loader is shorter) are timed.
    """
    rows = []
    for num_workers in worker_counts:
        loader = make_loader(num_workers)
        skip = warmup
        try:
            length = len(loader)  # type: ignore[arg-type]
        except TypeError:
            length = None
        if length is not None and length <= skip:
            skip = max(0, length - 1)  # keep at least one batch to time on a tiny loader
        iterator = iter(loader)
        batches = samples = 0
        seconds = 0.0
        try:
            for _ in range(skip):
                next(iterator)
            start = time.perf_counter()
            for batch in iterator:
                samples += _batch_size(batch)
                batches += 1
                if batches >= n_batches:
                    break
            seconds = time.perf_counter() - start
        except StopIteration:
            pass  # shorter than the warm-up: nothing timed
        finally:
            # Shut the worker processes down before the next count starts its own.
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if callable(shutdown):
                shutdown()
            del iterator
        rows.append(
            {
                "num_workers": num_workers,
                "batches": batches,
                "seconds": seconds,
                "batches_per_s": batches / seconds if seconds > 0 else 0.0,
                "samples_per_s": samples / seconds if seconds > 0 else 0.0,
            }
        )
    return rows


def _throughput(row: Mapping[str, Any]) -> float:
    return float(row.get("samples_per_s") or row.get("batches_per_s") or 0.0)


def recommend_workers(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """{"best": fastest row, "recommended": worker count, "recommended_row": its row}.

    The recommendation is the smallest worker count within 5 % of the best throughput.
    """
    if not rows:
        return {"best": None, "recommended": None, "recommended_row": None}
    best = max(rows, key=_throughput)
    threshold = _throughput(best) * (1.0 - WORKERS_TOLERANCE)
    good = [row for row in rows if _throughput(row) >= threshold]
    chosen = min(good, key=lambda row: row["num_workers"])
    return {"best": best, "recommended": chosen["num_workers"], "recommended_row": chosen}


def default_worker_counts(cpu_count: int) -> list[int]:
    """0, 1, 2, 4, 8, ... up to `cpu_count` (which is included): default_worker_counts(6) ->
    [0, 1, 2, 4, 6]."""
    counts = [0]
    n = 1
    while n <= cpu_count:
        counts.append(n)
        n *= 2
    if cpu_count > 0 and counts[-1] != cpu_count:
        counts.append(cpu_count)
    return counts


# -- data paths --------------------------------------------------------------------------------


def _plain(cfg: Any) -> Any:
    """An OmegaConf config as plain containers (resolved where possible), anything else as is."""
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return cfg
    if not OmegaConf.is_config(cfg):
        return cfg
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - a broken interpolation is reported by config validation
        return OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)


def _is_path_key(key: Any) -> bool:
    return isinstance(key, str) and key.lower().endswith(PATH_KEY_SUFFIXES)


def _path_exists(value: str) -> bool:
    expanded = os.path.expanduser(os.path.expandvars(value))
    if glob.has_magic(expanded):
        return bool(glob.glob(expanded))
    return os.path.exists(expanded)


def check_paths(cfg_data: Mapping[str, Any], prefix: str = "data") -> list[str]:
    """Messages for every path-like value of the data config that doesn't exist.

    Relative paths are checked against the cwd, as training would resolve them. URLs
    (s3://, http://) and unset values ("", None, OmegaConf's "???") are skipped.
    """
    problems: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                child = f"{where}.{key}"
                if isinstance(value, (Mapping, list, tuple)):
                    walk(value, child)
                elif _is_path_key(key) and isinstance(value, str):
                    if value.strip() in ("", "???") or "://" in value:
                        continue
                    if not _path_exists(value):
                        problems.append(f"{child}: path '{value}' does not exist")
        elif isinstance(node, (list, tuple)):
            for index, value in enumerate(node):
                if isinstance(value, (Mapping, list, tuple)):
                    walk(value, f"{where}[{index}]")

    walk(_plain(cfg_data), prefix)
    return problems


# -- report ------------------------------------------------------------------------------------


def render_report(
    report: Mapping[str, Any],
    problems: list[str],
    loader_rows: Optional[list[Mapping[str, Any]]],
    recommendation: Optional[Mapping[str, Any]],
    console: Any,
) -> None:
    """Print the environment, the problems found and the loader timings as rich tables."""
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    env = Table(title="Environment", show_header=False, title_justify="left")
    env.add_column("item", style="bold")
    env.add_column("value")
    rows = [
        ("python", report.get("python")),
        ("platform", report.get("platform")),
        ("torch", report.get("torch")),
        ("torch CUDA build", report.get("cuda") or "none (CPU-only build)"),
        ("cuDNN", report.get("cudnn") or "none"),
        ("CUDA available", report.get("cuda_available")),
        ("CUDA devices", ", ".join(report.get("devices") or []) or "none"),
        ("MPS available", report.get("mps_available")),
        ("CPU cores", report.get("cpu_count")),
    ]
    if report.get("cuda_visible_devices") is not None:
        rows.append(("CUDA_VISIBLE_DEVICES", report.get("cuda_visible_devices")))
    for name, value in rows:
        env.add_row(name, escape(str(value)))
    console.print(env)

    if problems:
        body = "\n\n".join(f"- {escape(p)}" for p in problems)
        console.print(Panel(body, title=f"{len(problems)} problem(s)", border_style="bold red"))
    else:
        console.print("[green]No problems found.[/green]")

    if loader_rows:
        recommended = (recommendation or {}).get("recommended")
        table = Table(title="Data loader throughput", title_justify="left")
        for column in ("num_workers", "batches", "seconds", "batches/s", "samples/s"):
            table.add_column(column, justify="right")
        for row in loader_rows:
            mark = row["num_workers"] == recommended
            style = "bold green" if mark else None
            table.add_row(
                str(row["num_workers"]) + (" *" if mark else ""),
                str(row["batches"]),
                f"{row['seconds']:.2f}",
                f"{row['batches_per_s']:.1f}",
                f"{row['samples_per_s']:.1f}",
                style=style,
            )
        console.print(table)
        if recommended is not None:
            console.print(
                f"Recommended: [bold]trainer.num_workers={recommended}[/bold] (the fewest workers "
                "within 5 % of the best throughput)."
            )
