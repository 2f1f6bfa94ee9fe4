"""The `Task` interface every family implements, and the context the trainer hands it.

One `Trainer` (podium.engine.trainer) runs every family; a family supplies the hooks below, in
the spirit of nnU-Net's hook-rich trainer: a variant overrides one hook, not the loop.

What the interface carries, because the families need it:
- several training loaders at once (`train_loaders`): labelled source + unlabelled target for
  domain adaptation, two views for contrastive pretraining. With more than one loader the first
  one defines the epoch and the others cycle; `training_step` then receives a dict
  `{loader_name: batch}`.
- auxiliary modules beside the model (`build_aux_modules`): an EMA teacher, a momentum encoder
  with its queue, ... They are moved to the device, checkpointed and resumed with the model.
  They are updated by the task (e.g. in `on_optimizer_step`), never by the optimizer: trainable
  parts (an auxiliary decoder) belong inside the model.
- batches of any structure: the task's collate function decides.
- evaluation that aggregates per volume or per group: `evaluation_step` returns per-sample
  records (dicts), the trainer gathers them from every rank, and `aggregate` reduces them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.data import Dataset


@dataclass
class StepContext:
    """What a task sees of the trainer inside a step."""

    fabric: Any  # lightning.fabric.Fabric
    step: int  # optimizer steps done so far
    epoch: int
    max_steps: int  # total optimizer steps planned for the run
    aux: dict[str, nn.Module] = field(default_factory=dict)
    run_dir: Path | None = None  # the run folder (debug images a task writes during training)

    @property
    def device(self) -> torch.device:
        return self.fabric.device

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1] (for ramps such as mask-augmentation schedules)."""
        return min(1.0, self.step / max(1, self.max_steps))


class Task:
    """Base class: override the hooks your family needs.

    `cfg` is the whole resolved config (an OmegaConf DictConfig); a task reads `cfg.data`,
    `cfg.model`, `cfg.loss` and `cfg.task`.
    """

    #: metric the trainer monitors for the best checkpoint and early stopping
    monitor: str = "val/loss"
    monitor_mode: str = "min"

    #: the run card this task was restored from (`use_card`); None while training
    card: dict | None = None

    def __init__(self, cfg):
        self.cfg = cfg

    # ---- building -------------------------------------------------------------------------
    def build_datasets(self) -> dict[str, Dataset]:
        """Return the datasets by split: 'train', 'val', and any number of test splits
        (every split whose name starts with 'test' is evaluated by `podium eval`).

        Default: the registered dataset `cfg.data.name`, called with the run seed and
        `dataset_context()`, built once and kept (a task asks for it many times)."""
        if getattr(self, "_datasets", None) is None:
            from podium.engine import registry

            self._datasets = registry.build("dataset", self.cfg.data.name, self.cfg.data, seed=self.cfg.seed,
                                            **self.dataset_context())
        return self._datasets

    def dataset_context(self) -> dict[str, Any]:
        """Extra keyword arguments for the dataset factory (e.g. max_epochs for schedules)."""
        return {}

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    # ---- the run card (run.json, podium.engine.runcard) ------------------------------------
    def describe(self) -> dict:
        """The run card: a JSON-able dict with at least "task", "model", "model_kwargs" (what
        `build_model` takes beyond cfg.model, e.g. num_classes), "input" (channels, size or
        window, normalisation) and "output" ("kind", "meaning" in words, class / landmark
        names). Called after `build_datasets` at training time; with `use_card` it is all the
        task needs to build its model and preprocess a raw input without the training data."""
        raise NotImplementedError(f"the {type(self).__name__} does not describe itself (no run card)")

    def use_card(self, card: dict) -> None:
        """Take the facts the training data gave (head size, names) from `card` from now on."""
        self.card = card

    def build_loss(self, datasets: dict[str, Dataset]) -> None:
        """Build and keep the loss (it may need the training labels, e.g. class weights)."""

    def parameter_groups(self, model: nn.Module) -> list:
        """Parameters for the optimizer; override for per-group learning rates (a head at 10x)."""
        return [p for p in model.parameters() if p.requires_grad]

    def build_aux_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {}

    def train_loaders(self, datasets: dict[str, Dataset], make_loader) -> dict[str, Iterable]:
        """Training loaders by name; `make_loader(dataset, train=True)` is the engine's factory."""
        return {"train": make_loader(datasets["train"], train=True)}

    def collate_fn(self) -> Callable | None:
        return None

    # ---- training -------------------------------------------------------------------------
    def training_step(self, model: nn.Module, batch: Any, ctx: StepContext) -> dict[str, Any]:
        """Return a dict with a scalar tensor 'loss' and any other scalars to log."""
        raise NotImplementedError

    def on_optimizer_step(self, model: nn.Module, ctx: StepContext) -> None:
        """Called after each optimizer step (EMA teacher update, queue maintenance...)."""

    # ---- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluation_step(self, model: nn.Module, batch: Any, ctx: StepContext) -> list[dict]:
        """Per-sample records for `aggregate` (plain Python / numpy values: they are gathered
        across ranks)."""
        raise NotImplementedError

    def aggregate(self, records: list[dict], split: str) -> dict[str, float]:
        """Reduce the gathered records of a split to flat metrics, e.g. {'macro_f1': 0.93}."""
        raise NotImplementedError

    def save_predictions(self, records: list[dict], split: str, out_dir: Path) -> list[Path]:
        """Write a split's predictions (e.g. probabilities) so ensembles and CV can reuse them."""
        return []

    def score_predictions(self, predictions, split: str) -> dict[str, float]:
        """Score a saved prediction set (`podium.engine.predictions.PredictionSet`, e.g. an
        ensemble's) unchanged, from its prediction and truth arrays alone: the same flat metrics
        `aggregate` gives for the records it was saved from."""
        from podium.errors import UserError

        raise UserError(f"the {type(self).__name__} cannot score saved predictions yet.")

    # ---- cross-validation (`podium cv`, podium.engine.folds) --------------------------------
    def cv_keys(self, dataset: Dataset) -> list[dict]:
        """One key per sample of a train or val split, in dataset order: {"id": the sample id
        the saved predictions use, "label": a class to stratify on (omit when there is none),
        any grouping column (e.g. "patient", "volume") that `cv.group_by` may name}."""
        from podium.errors import UserError

        raise UserError(f"the {type(self).__name__} does not support cross-validation (cv.fold) yet.")

    def cv_subset(self, parts: list[Dataset], picks: list[tuple[int, int]], train: bool) -> Dataset:
        """A dataset of the picked samples ((part, index in it) over `parts` = [train, val],
        in pick order) with train augmentation (`train`) or eval preprocessing, of the kind
        this family's splits are, so that its other hooks (ids, plots, saved predictions) work
        on it."""
        from podium.errors import UserError

        raise UserError(f"the {type(self).__name__} does not support cross-validation (cv.fold) yet.")

    # ---- outputs --------------------------------------------------------------------------
    def visualize(self, records: list[dict], split: str, out_dir: Path) -> list[Path]:
        """Write plots for a split's records; return the written files."""
        return []

    def predict(self, model: nn.Module, inputs: list[Path], out_file: Path, ctx: StepContext) -> Path:
        """Predict on raw input files and write them to `out_file`; return its path."""
        raise NotImplementedError

    def example_input(self) -> torch.Tensor | None:
        """A batch that exercises the model (export, doctor, benchmarks)."""
        return None

    def sample_image(self, split: str, sample_id: str):
        """The image of a saved sample, as the model saw it before normalisation: a numpy
        (H, W) or (H, W, 3) array (uint8 or floats in [0, 1]) for the toolkit's grids (`podium
        diff`, `podium audit`); None when this family cannot show it. `split` is the saved set's
        split; an id missing from it (out-of-fold sets pool train and val) is looked up in the
        others. It may read the training data (a UserError when it is not on disk)."""
        return None

    def locate_sample(self, split: str, sample_id: str, ids: Callable[[Any], list[str] | None]):
        """(dataset, index) of the sample `sample_id`: looked up in `split` first, then in the other
        splits (out-of-fold sets pool train and val); None when no split holds it. `ids(dataset)`
        lists a dataset's sample ids in order, or None to skip it; each split's list is built once."""
        datasets = self.build_datasets()
        rows = self.__dict__.setdefault("_id_rows", {})  # split -> {sample id: index}
        for name in [split, *[n for n in datasets if n != split]]:
            dataset = datasets.get(name)
            if dataset is None:
                continue
            if name not in rows:
                listed = ids(dataset)
                rows[name] = {} if listed is None else {str(i): k for k, i in enumerate(listed)}
            if sample_id in rows[name]:
                return dataset, rows[name][sample_id]
        return None

    # ---- test-time augmentation (`tta=d4|flips|scales`, podium.engine.tta) -----------------
    def tta_outputs(self) -> dict[str, str] | str | None:
        """What the model's raw output is, so TTA can map each view's output back and merge it:
        one kind for a tensor output, {key: kind} for a dict ("class_logits", "mask_logits",
        "maps", "points", "invariant"; see podium.engine.tta.KINDS). None (the default): the
        family has no TTA, and asking for it is a UserError naming `tta`."""
        return None

    # ---- serving (`podium export`, `podium serve`) -----------------------------------------
    # One preprocessing path for eval, predict and serving: a decoded image goes through
    # `serving_preprocess` into the exported graph (`serving_module`), whose raw outputs
    # `serving_postprocess` turns into the task's natural answer.
    def serving_module(self, model: nn.Module) -> nn.Module:
        """The exportable graph: a float32 batch (B, C, H, W) -> one tensor per sample row
        (class probabilities, landmark points in input pixels, ...)."""
        raise NotImplementedError(f"the {type(self).__name__} does not support serving yet")

    def serving_spec(self) -> dict:
        """JSON-able pre/post-processing description written next to an exported model, so a
        client can reproduce them: {"task", "input": {"channels", "height", "width", "dtype"},
        "preprocess": [steps], "output": {"name", "kind", ...}}."""
        raise NotImplementedError(f"the {type(self).__name__} does not support serving yet")

    def serving_preprocess(self, image: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """A decoded uint8 image (C, H, W) -> the float32 network input (C, H', W') and the
        metadata `serving_postprocess` needs (e.g. the letterbox); UserError when the image
        cannot be used (wrong channel count...)."""
        raise NotImplementedError(f"the {type(self).__name__} does not support serving yet")

    def serving_decode(self, data: bytes) -> Any:
        """Non-image inputs (k-space files...): request bytes -> what `serving_preprocess` takes;
        UserError for unusable bytes. None (the default) means "decode as an image". A task that
        overrides it says so in its spec ("input": {"kind": ...}) and takes no JSON arrays."""
        return None

    def serving_example(self) -> torch.Tensor:
        """One sample of the exported graph's input, with its batch axis (export traces it)."""
        return self.example_input()

    def serving_postprocess(self, output: torch.Tensor, meta: dict) -> dict:
        """One sample's row of the graph's output -> a JSON-able answer."""
        raise NotImplementedError(f"the {type(self).__name__} does not support serving yet")
