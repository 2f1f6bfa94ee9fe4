"""Export a trained run for serving: ONNX, TorchScript, or a Triton model repository.

    podium export runs/<run> --format onnx --out exported/digits
    podium export runs/<run> --format triton --out model_repository

    import torch
    from podium.serve.export import export_run, load_onnx_session, parity
    folder = export_run("runs/<run>", "onnx", "exported/digits")
    parity(folder, torch.randn(5, 3, 32, 32))   # {"max_abs": 2e-08, ...} against PyTorch
    load_onnx_session(folder, threads=2).run(None, {"image": torch.randn(2, 3, 32, 32).numpy()})

The exported graph is the task's `serving_module` (classification: the network, then softmax),
traced on CPU in float32 from `task.example_input()` repeated to a small batch; the batch axis
stays dynamic and is checked at other batch sizes before the export is kept. Beside the model,
`preprocess.json` holds `task.serving_spec()` (the steps a client applies to a decoded image and
what the output means) plus where the model came from, so a client needs nothing from podium.

ONNX goes through torch's classic TorchScript-based exporter (`dynamo=False`, `dynamic_axes`).
Both exporters give the same numbers on timm CNNs and ViTs here (torch 2.14), but the dynamo one
has no opset below 18 (asked for 17 it writes 18 after a failed conversion), takes 10-20x
longer and prints pages; the classic one writes exactly the opset asked for, which older ONNX
Runtime and Triton builds can read.

Triton model repository (reference.md "Serving"; Triton's model-configuration docs):

    OUT/<model_name>/config.pbtxt      platform "onnxruntime_onnx", dynamic batching, instances
    OUT/<model_name>/1/model.onnx
    OUT/<model_name>/preprocess.json

OUT may already hold other models; only `<model_name>/` is written. Every export is built in a
temporary folder beside its target and renamed into place at the end, so a failed export
leaves nothing behind. Each export folder holds a marker, `.podium-export.json`: `overwrite`
replaces only a folder that has it (or an empty one), never a folder someone else filled.

Triton's preferred batch sizes default to [max_batch_size // 2, max_batch_size] ([4, 8] for the
default 8, [1] for 1): the full batch the scheduler waits for, and half of it, which it takes
rather than waiting out the queue delay under moderate load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from podium.errors import UserError

FORMATS = ("onnx", "torchscript", "triton")
INSTANCE_KINDS = ("cpu", "gpu")
MIN_OPSET = 13  # Softmax/ReduceX over one axis and dynamic shapes as every current runtime reads them
SPEC_FILE = "preprocess.json"
MARKER_FILE = ".podium-export.json"  # what `overwrite` looks for before it replaces a folder


# ---- loading the run ------------------------------------------------------------------------


def load_serving_module(run_dir, checkpoint: str = "best", console=None, overrides=None):
    """(task, module): the run's task and its `serving_module` on CPU in float32, eval mode,
    built from the run folder alone (config.yaml, run.json, the checkpoint): the training data
    is read only for a run from before run cards, which has no run.json. The graph includes the
    run's test-time augmentation (`tta=...` in its config or in `overrides`, e.g. ["tta=flips"]),
    so a served answer is the one `podium eval` and `podium predict` give."""
    from rich.console import Console

    from podium.engine import tta
    from podium.engine.runcard import checkpoint_path
    from podium.engine.session import trainer_for_run
    from podium.engine.parallel import unwrap as _unwrap

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist.")
    path = checkpoint_path(run_dir, checkpoint)
    # Exports are traced on CPU in float32 whatever the run trained on (a GPU, bf16).
    overrides = ["trainer.accelerator=cpu", "trainer.precision=32-true", *(overrides or [])]
    trainer, _ = trainer_for_run(run_dir, overrides, console or Console(stderr=True), str(path), with_data=False)
    task = trainer.task
    try:
        # TTA around the plain model: the views and their inverses are traced into the graph
        module = task.serving_module(tta.wrap(_unwrap(trainer.eval_model(tta=False)), trainer.cfg, task))
    except NotImplementedError as err:
        raise UserError(f"{err}: it cannot be exported.") from None
    module = module.float().cpu().eval().requires_grad_(False)
    return task, module


# ---- writers --------------------------------------------------------------------------------


def _export_onnx(module, batch: torch.Tensor, path: Path, opset: int, input_name: str,
                 output_name: str) -> int:
    """Write `path`; return the opset the file declares."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # torch >= 2.9 flags the classic exporter as legacy on every call; the choice is deliberate
        # (see the module docstring).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            torch.onnx.export(module, (batch,), str(path), input_names=[input_name], output_names=[output_name],
                              opset_version=opset, dynamo=False, do_constant_folding=True,
                              dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
        except RuntimeError as err:
            if "Unsupported onnx_opset_version" in str(err):
                raise UserError(f"opset {opset} is not supported by torch {torch.__version__}'s "
                                f"ONNX exporter ({err}); 17 is the default.") from None
            raise
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _export_torchscript(module, batch: torch.Tensor, path: Path) -> None:
    # check_inputs at other batch sizes re-trace and compare graphs: a batch size baked into a
    # reshape fails here instead of in the server.
    others = [(batch[:1],), (torch.cat([batch, batch[:1]]),)]
    with warnings.catch_warnings(), torch.no_grad():
        # torch.jit is deprecated in favour of torch.export, but its .pt files remain the ones
        # that C++ (libtorch) and Triton's PyTorch backend load.
        warnings.filterwarnings("ignore", category=FutureWarning)
        traced = torch.jit.trace(module, batch, check_trace=True, check_inputs=others)
        torch.jit.save(traced, str(path))


def load_torchscript(path):
    """A TorchScript export (file or folder) on CPU, in eval mode."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # see _export_torchscript
        return torch.jit.load(str(model_file(path)), map_location="cpu").eval()


def triton_config(name: str, input_name: str, input_dims, output_name: str, output_dims,
                  max_batch_size: int, preferred_batch_sizes, max_queue_delay_us: int, instances: int,
                  instance_kind: str = "cpu") -> str:
    """config.pbtxt text (protobuf text format); dims exclude the batch axis, which Triton adds
    because max_batch_size > 0."""
    def dims(values) -> str:
        return ", ".join(str(int(v)) for v in values)

    preferred = f"  preferred_batch_size: [ {dims(preferred_batch_sizes)} ]\n" if preferred_batch_sizes else ""
    return (f'name: "{name}"\n'
            f'platform: "onnxruntime_onnx"\n'
            f"max_batch_size: {max_batch_size}\n"
            f"input [\n  {{\n    name: \"{input_name}\"\n    data_type: TYPE_FP32\n"
            f"    dims: [ {dims(input_dims)} ]\n  }}\n]\n"
            f"output [\n  {{\n    name: \"{output_name}\"\n    data_type: TYPE_FP32\n"
            f"    dims: [ {dims(output_dims)} ]\n  }}\n]\n"
            f"dynamic_batching {{\n{preferred}  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n"
            f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_{instance_kind.upper()}\n  }}\n]\n")


def triton_model_name(run_dir) -> str:
    """The run folder's name as a Triton model name: lower case, [a-z0-9_] only."""
    name = re.sub(r"[^a-z0-9_]+", "_", Path(run_dir).resolve().name.lower()).strip("_")
    return name or "model"


def default_preferred_batch_sizes(max_batch_size: int) -> list[int]:
    """[max_batch_size // 2, max_batch_size] without zero or duplicates: [1], [1, 2], [2, 4], [4, 8]."""
    return sorted({max(1, max_batch_size // 2), max_batch_size})


def _check_triton_options(model_name, max_batch_size, preferred_batch_sizes, max_queue_delay_us, instances,
                          instance_kind) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", model_name):
        raise UserError(f"model name {model_name!r} must use letters, digits, '_', '-' or '.' only.")
    if max_batch_size < 1:
        raise UserError(f"max_batch_size must be at least 1, got {max_batch_size}.")
    wrong = [b for b in preferred_batch_sizes if not 1 <= b <= max_batch_size]
    if wrong:
        raise UserError(f"preferred batch sizes {wrong} are outside 1..max_batch_size ({max_batch_size}).")
    if max_queue_delay_us < 0 or instances < 1:
        raise UserError(f"max_queue_delay_us must be >= 0 and instances >= 1, got {max_queue_delay_us} "
                        f"and {instances}.")
    if instance_kind not in INSTANCE_KINDS:
        raise UserError(f"instance kind {instance_kind!r} is not one of {', '.join(INSTANCE_KINDS)}.")


# ---- atomic output --------------------------------------------------------------------------


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} is a file; the export needs a folder there.")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not overwrite:
        raise UserError(f"{target} is not empty; choose another folder or pass overwrite=True "
                        f"(--overwrite) to replace a previous export there.")
    if not (target / MARKER_FILE).is_file():
        # --overwrite once deleted a projects folder given by mistake: replace only our own output.
        raise UserError(f"{target} is not a podium export (it has no {MARKER_FILE}); --overwrite replaces "
                        f"only a previous export, so nothing was changed. Choose another folder.")


@contextmanager
def _atomic_folder(target: Path, overwrite: bool):
    """Yield a temporary folder beside `target`; on success it replaces `target` by rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; a server often runs as another user
    try:
        yield tmp
        _check_target(target, overwrite)  # again: the folder may have filled while we exported
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            if old is not None:
                os.rename(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- the export -----------------------------------------------------------------------------


def export_run(run_dir, fmt: str, out_dir, checkpoint: str = "best", opset: int = 17, batch_size_hint: int = 4,
               max_batch_size: int = 8, preferred_batch_sizes=None, max_queue_delay_us: int = 5000,
               instances: int = 1, model_name: str | None = None, instance_kind: str = "cpu",
               overwrite: bool = False, console=None, overrides=None) -> Path:
    """Export a run; return the folder holding the model and preprocess.json (`out_dir`, or
    `out_dir/<model_name>` for Triton). `preferred_batch_sizes` None: derived from
    `max_batch_size` (see `default_preferred_batch_sizes`). `overrides`: of the run's config,
    e.g. ["tta=flips"] to export with test-time augmentation the run trained without."""
    from podium import __version__

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}.")
    if batch_size_hint < 1:
        raise UserError(f"batch_size_hint must be at least 1, got {batch_size_hint}.")
    if fmt != "torchscript" and opset < MIN_OPSET:
        raise UserError(f"opset {opset} is too old; use {MIN_OPSET} or newer (default 17).")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; the export needs a folder there.")
    target = out_dir
    if fmt == "triton":
        model_name = model_name or triton_model_name(run_dir)
        preferred_batch_sizes = ([int(b) for b in preferred_batch_sizes] if preferred_batch_sizes is not None
                                 else default_preferred_batch_sizes(int(max_batch_size)))
        _check_triton_options(model_name, max_batch_size, preferred_batch_sizes, max_queue_delay_us, instances,
                              instance_kind)
        target = out_dir / model_name
    _check_target(target, overwrite)  # before the slow part

    task, module = load_serving_module(run_dir, checkpoint, console, overrides)
    from podium.engine import tta

    spec = {**task.serving_spec(), "tta": tta.describe(task.cfg)}
    input_name = spec.get("input", {}).get("name", "image")
    output_name = spec["output"]["name"]
    if fmt != "torchscript" and spec.get("onnx", True) is False:
        raise UserError(f"the {spec['task']} graph cannot be exported to ONNX ({spec.get('onnx_reason', 'unsupported ops')}); "
                        f"use --format torchscript (podium serve runs it with --backend torch).")
    example = task.serving_example().float().cpu()
    batch = example[:1].repeat(batch_size_hint, *[1] * (example.ndim - 1))
    with torch.no_grad():
        output_dims = list(module(batch).shape[1:])

    with _atomic_folder(target, overwrite) as tmp:
        if fmt == "torchscript":
            _export_torchscript(module, batch, tmp / "model.pt")
            written_opset = None
        else:
            onnx_path = tmp / ("1/model.onnx" if fmt == "triton" else "model.onnx")
            written_opset = _export_onnx(module, batch, onnx_path, opset, input_name, output_name)
        if fmt == "triton":
            (tmp / "config.pbtxt").write_text(triton_config(
                model_name, input_name, batch.shape[1:], output_name, output_dims, max_batch_size,
                preferred_batch_sizes, max_queue_delay_us, instances, instance_kind))
        info = {**spec, "format": fmt, "opset": written_opset, "checkpoint": portable_path(checkpoint),
                "podium_version": __version__, "run": run_dir.resolve().name,
                "exported_from": portable_path(run_dir), "input_name": input_name, "output_name": output_name,
                "overrides": list(overrides or [])}
        (tmp / SPEC_FILE).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / MARKER_FILE).write_text(json.dumps({"format": fmt, "run": info["run"],
                                                   "podium_version": __version__}) + "\n")
        _verify(tmp, module, example, batch_size_hint)
    return target


def portable_path(path) -> str:
    """A path fit to publish (preprocess.json, /info): relative to the cwd when it lies below it,
    else its last component; an absolute path would show user and machine layout to clients.
    Names like "best" pass through."""
    path = Path(path)
    if not path.is_absolute() and ".." not in path.parts:
        return path.as_posix()
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.name


def _verify(folder: Path, module, example: torch.Tensor, batch_size_hint: int) -> None:
    """Run the written model at batch sizes other than the traced one: a dynamic axis that is
    not really dynamic (a batch size baked into a reshape) fails the export, not the server."""
    generator = torch.Generator().manual_seed(0)
    for rows in (1, batch_size_hint + 1):
        # distinct rows, so a graph that mixes samples shows too
        inputs = example[:1] + 0.1 * torch.randn((rows, *example.shape[1:]), generator=generator)
        try:
            result = parity(folder, inputs, module=module, threads=1)
        except Exception as err:  # ONNX Runtime refuses a reshape to the traced batch size
            raise RuntimeError(f"the exported model fails at batch size {rows} (the graph may depend on "
                               f"the batch size): {err}") from err
        with torch.no_grad():
            scale = max(1.0, float(module(inputs).abs().max()))
        if not result["max_abs"] <= 1e-3 * scale:
            raise RuntimeError(f"the exported model differs from PyTorch at batch size {rows}: max abs "
                               f"difference {result['max_abs']:.3g} (the graph may depend on the batch size).")


# ---- using an export ------------------------------------------------------------------------


def model_file(path) -> Path:
    """The model file of an export: `path` itself, or model.onnx / model.pt / 1/model.onnx in it."""
    path = Path(path)
    if path.is_file():
        return path
    for name in ("model.onnx", "model.pt", "1/model.onnx"):
        if (path / name).is_file():
            return path / name
    raise UserError(f"{path} holds no exported model (model.onnx, model.pt or 1/model.onnx).")


def read_spec(path) -> dict:
    """The preprocess.json of an export (next to the model, or one level up for Triton)."""
    model = model_file(path)
    for folder in (model.parent, model.parent.parent):
        if (folder / SPEC_FILE).is_file():
            return json.loads((folder / SPEC_FILE).read_text())
    raise UserError(f"no {SPEC_FILE} found next to {model}.")


def load_onnx_session(path, threads: int | None = None):
    """An ONNX Runtime CPU session for an exported model file or folder (or the model's bytes);
    `threads` sets the intra-op pool (None: ONNX Runtime's default, one per physical core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise UserError(f"threads must be at least 1, got {threads}.")
        options.intra_op_num_threads = threads
    # A CNN is one chain of operators: the parallelism that pays is inside each operator.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    model = path if isinstance(path, bytes) else str(model_file(path))
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def parity(exported, inputs, module=None, run_dir=None, checkpoint: str | None = None,
           threads: int | None = None) -> dict:
    """Run the exported model (ONNX Runtime on CPU, or TorchScript) and the PyTorch serving module
    on the same float32 batch; return {"max_abs", "batch_size", "model"}. Without `module`, it is
    loaded from `run_dir` / `checkpoint`, by default the run and checkpoint the export names."""
    path = model_file(exported)
    inputs = torch.as_tensor(np.asarray(inputs, dtype=np.float32))
    spec = read_spec(path)
    if module is None:
        run_dir = run_dir or spec["exported_from"]  # relative to the cwd the export ran in
        if not Path(run_dir).is_dir():
            raise UserError(f"the run {run_dir!r} named by {SPEC_FILE} is not a folder here; pass run_dir=.")
        _, module = load_serving_module(run_dir, checkpoint or spec["checkpoint"],
                                        overrides=spec.get("overrides"))  # e.g. the export's tta=
    with torch.no_grad():
        expected = module(inputs).numpy()
        if path.suffix == ".onnx":
            got = load_onnx_session(path, threads).run(None, {spec["input_name"]: inputs.numpy()})[0]
        else:
            got = load_torchscript(path)(inputs).numpy()
    if got.shape != expected.shape:
        raise RuntimeError(f"exported output shape {got.shape} differs from PyTorch's {expected.shape}.")
    return {"max_abs": float(np.abs(got - expected).max()), "batch_size": len(inputs), "model": str(path)}
