"""The Trainer with a toy second task that uses what the other families need: two training
loaders at once (labelled source + unlabelled target, as in domain adaptation), an EMA teacher
kept as an auxiliary module, randomness inside the step, and evaluation aggregated per group
before averaging (as MRI aggregates per volume and per acceleration x anatomy)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset

from podium.engine.checkpoint import load_checkpoint
from podium.engine.schema import ENGINE_GROUPS
from podium.engine.session import make_fabric
from podium.engine.parallel import unwrap as _unwrap
from podium.engine.trainer import Trainer
from podium.errors import TrainingDiverged
from podium.engine.task import Task


class Points(Dataset):
    """y = x @ w + noise; `labelled=False` returns x alone (the unlabelled target domain)."""

    def __init__(self, n: int, seed: int, labelled: bool = True, shift: float = 0.0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g) + shift
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g)
        self.labelled = labelled

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        # augmentation noise drawn from the (per-sample seeded) global torch RNG
        x = self.x[i] + 0.01 * torch.randn(4)
        return (x, self.y[i], i % 3) if self.labelled else x


class ToyAdaptationTask(Task):
    monitor = "val/mse"
    monitor_mode = "min"

    def __init__(self, cfg, two_loaders=True, nan_at_step=None, interrupt_at_step=None, blow_up_at_step=None):
        super().__init__(cfg)
        self.two_loaders, self.nan_at_step, self.interrupt_at_step = two_loaders, nan_at_step, interrupt_at_step
        self.blow_up_at_step = blow_up_at_step  # the weights overflow while the loss was still finite

    def build_datasets(self):
        return {"train": Points(40, 0), "target": Points(24, 1, labelled=False, shift=0.5),
                "val": Points(21, 2), "test": Points(15, 3)}

    def build_model(self):
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 1))

    def build_aux_modules(self, model):
        teacher = copy.deepcopy(model)
        teacher.requires_grad_(False)
        return {"teacher": teacher}

    def train_loaders(self, datasets, make_loader):
        loaders = {"source": make_loader(datasets["train"], train=True)}
        if self.two_loaders:
            loaders["target"] = make_loader(datasets["target"], train=True)
        return loaders

    def training_step(self, model, batch, ctx):
        if self.interrupt_at_step is not None and ctx.step == self.interrupt_at_step:
            raise KeyboardInterrupt
        source = batch["source"] if self.two_loaders else batch
        x, y, _ = source
        loss = nn.functional.mse_loss(model(x).squeeze(1), y)
        if self.two_loaders:
            xt = batch["target"]
            with torch.no_grad():
                pseudo = ctx.aux["teacher"](xt)
            loss = loss + 0.1 * nn.functional.mse_loss(model(xt), pseudo)
        if self.nan_at_step is not None and ctx.step >= self.nan_at_step:
            loss = loss * float("nan")
        return {"loss": loss, "consistency_weight": 0.1}

    def on_optimizer_step(self, model, ctx):
        if self.blow_up_at_step is not None and ctx.step == self.blow_up_at_step:
            with torch.no_grad():
                _unwrap(model)[0].weight.mul_(float("inf"))
        with torch.no_grad():
            for t, s in zip(ctx.aux["teacher"].parameters(), _unwrap(model).parameters()):
                t.mul_(0.9).add_(s, alpha=0.1)

    def evaluation_step(self, model, batch, ctx):
        x, y, group = batch
        err = (model(x).squeeze(1) - y) ** 2
        return [{"group": int(g), "se": float(e)} for g, e in zip(group, err)]

    def aggregate(self, records, split):
        groups = sorted({r["group"] for r in records})
        per_group = [sum(r["se"] for r in records if r["group"] == g) / sum(r["group"] == g for r in records)
                     for g in groups]
        out = {f"mse_group{g}": v for g, v in zip(groups, per_group)}
        out["mse"] = sum(per_group) / len(per_group)
        out["n"] = float(len(records))
        return out


def make_cfg(tmp_path, **trainer):
    cfg = OmegaConf.create({name: OmegaConf.structured(schema) for name, schema in ENGINE_GROUPS.items()})
    cfg.seed = 7
    cfg.tracking.backend = "none"
    cfg.trainer.accelerator = "cpu"
    cfg.trainer.batch_size = 8
    cfg.trainer.num_workers = 0
    cfg.trainer.progress_bar = False
    cfg.trainer.checkpoint_every_minutes = 0
    cfg.trainer.max_epochs = 3
    cfg.optim.lr = 0.05
    for key, value in trainer.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    cfg.run.dir = str(tmp_path)
    return cfg


def run(tmp_path, resume=None, task_kwargs=None, **trainer):
    cfg = make_cfg(tmp_path, **trainer)
    fabric = make_fabric(cfg.trainer, console=None)
    task = ToyAdaptationTask(cfg, **(task_kwargs or {}))
    t = Trainer(cfg, task, tmp_path, fabric)
    t.setup()
    t.fit(resume)
    return t


def weights(trainer):
    return {k: v.clone() for k, v in _unwrap(trainer.model).state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_two_loaders_and_aux_teacher_are_trained_and_checkpointed(tmp_path):
    t = run(tmp_path)
    teacher = t.aux["teacher"].state_dict()
    assert not same(teacher, weights(t))  # an EMA lags the student
    ckpt = load_checkpoint(tmp_path / "checkpoints/last.pt")
    assert set(ckpt["aux"]) == {"teacher"}
    assert same(ckpt["aux"]["teacher"], teacher)
    assert ckpt["state"]["epoch"] == 3 and ckpt["state"]["step"] == 3 * 5
    # the secondary loader cycles: 15 batches of 8 over 24 targets = 5 passes; the position is
    # advanced lazily, so it reads "pass 4, all 3 batches consumed"
    assert ckpt["state"]["loader_pos"]["target"] == [4, 3]
    # evaluation aggregated per group, every validation sample counted exactly once
    last = t.state.history[-1]
    assert last["val/n"] == 21 and {"val/mse_group0", "val/mse_group2"} <= set(last)
    assert last["train/consistency_weight"] == pytest.approx(0.1)


def test_same_seed_gives_identical_weights(tmp_path):
    a = weights(run(tmp_path / "a"))
    b = weights(run(tmp_path / "b"))
    assert same(a, b)


@pytest.mark.parametrize("stop_step", [3, 7, 10])
def test_interrupt_and_resume_equals_uninterrupted(tmp_path, stop_step):
    """Ctrl-C inside an epoch saves a checkpoint; resuming gives bit-identical weights,
    including the secondary loader's position, the teacher and the RNG of the step."""
    full = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", task_kwargs={"interrupt_at_step": stop_step})
    saved = load_checkpoint(tmp_path / "cut/checkpoints/last.pt")
    assert saved["state"]["step"] == stop_step
    resumed = run(tmp_path / "cut", resume=tmp_path / "cut/checkpoints/last.pt")
    assert same(weights(full), weights(resumed))
    assert same(full.aux["teacher"].state_dict(), resumed.aux["teacher"].state_dict())
    assert [r["step"] for r in resumed.state.history] == [r["step"] for r in full.state.history]


def test_by_steps_with_validation_every_n_steps(tmp_path):
    t = run(tmp_path, trainer__max_steps=12, trainer__val_every_n_steps=5)
    assert [r["step"] for r in t.state.history] == [5, 10, 12]
    assert t.state.step == 12


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"Kept untouched: \S+last\.pt \(epoch 1, step 6\); "
                                               r"\S+best\.pt \(epoch 1, step 5\)"):
        run(tmp_path, task_kwargs={"nan_at_step": 6}, trainer__checkpoint_every_n_steps=2)
    ckpt = load_checkpoint(tmp_path / "checkpoints/last.pt")
    assert ckpt["state"]["step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def finite(path):
    return all(torch.isfinite(v).all() for v in load_checkpoint(path)["model"].values())


def test_weights_that_blow_up_on_an_epochs_last_step_are_never_saved(tmp_path):
    """Step 10 ends epoch 2: its loss was finite, its update was not. Validation sees a NaN
    metric; neither best.pt nor last.pt of step 5 is overwritten."""
    with pytest.raises(TrainingDiverged, match=r"val/mse became nan.*Kept untouched: \S+last\.pt \(epoch 1, step 5\)"):
        run(tmp_path, task_kwargs={"blow_up_at_step": 10})
    for name in ("last.pt", "best.pt"):
        assert load_checkpoint(tmp_path / "checkpoints" / name)["state"]["step"] == 5
        assert finite(tmp_path / "checkpoints" / name)


def test_non_finite_weights_are_not_saved_even_without_validation(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"weights became non-finite \(0\.weight.*last\.pt was not written"):
        run(tmp_path, task_kwargs={"blow_up_at_step": 10}, trainer__val_every_n_epochs=5)
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["state"]["step"] == 5
    assert finite(tmp_path / "checkpoints/last.pt")


def test_a_blow_up_before_any_checkpoint_says_none_is_kept(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"holds none"):
        run(tmp_path, task_kwargs={"blow_up_at_step": 5})
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


def test_a_finished_run_trains_on_when_max_epochs_is_raised(tmp_path):
    first = run(tmp_path, trainer__max_epochs=2)
    assert first.state.finished and first.state.epoch == 2
    resumed = run(tmp_path, resume=tmp_path / "checkpoints/last.pt", trainer__max_epochs=4)
    assert resumed.state.epoch == 4 and resumed.state.step == 20 and resumed.state.finished
    assert [r["epoch"] for r in resumed.state.history] == [1, 2, 3, 4]


def no_dropout(monkeypatch):
    monkeypatch.setattr(ToyAdaptationTask, "build_model",
                        lambda self: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)))


def test_gradient_accumulation_equals_a_bigger_batch(tmp_path, monkeypatch):
    common = dict(trainer__max_steps=4, trainer__val_every_n_steps=100, optim__name="sgd", optim__momentum=0.0,
                  optim__weight_decay=0.0, sched__name="none")
    model_free = {"two_loaders": False}
    # dropout draws differ between 2x4 and 1x8 batches: check the equivalence without it
    no_dropout(monkeypatch)
    big = run(tmp_path / "big", task_kwargs=model_free, trainer__batch_size=8, **common)
    acc = run(tmp_path / "acc", task_kwargs=model_free, trainer__batch_size=4,
              trainer__accumulate_grad_batches=2, **common)
    for k, v in weights(big).items():
        torch.testing.assert_close(weights(acc)[k], v, rtol=1e-5, atol=1e-6)


def test_gradient_clipping_bounds_the_update(tmp_path, monkeypatch):
    cfg_common = dict(trainer__max_steps=1, optim__name="sgd", optim__momentum=0.0, optim__weight_decay=0.0,
                      sched__name="none", optim__lr=1.0)
    no_dropout(monkeypatch)
    clipped = run(tmp_path / "c", trainer__grad_clip_norm=1e-3, **cfg_common)
    cfg = make_cfg(tmp_path / "init")
    torch.manual_seed(cfg.seed)
    init = ToyAdaptationTask(cfg).build_model().state_dict()
    delta = torch.sqrt(sum(((weights(clipped)[k] - init[k]) ** 2).sum() for k in init))
    assert delta <= 1e-3 + 1e-6


def test_early_stopping(tmp_path):
    # lr 0 leaves the metric unchanged: the first validation is best, then patience runs out
    t = run(tmp_path, optim__lr=0.0, trainer__max_epochs=20, trainer__early_stopping__patience=2)
    assert len(t.state.history) == 3
    assert t.state.epoch == 3


def test_ema_weights_are_checkpointed_and_used_for_evaluation(tmp_path):
    t = run(tmp_path, trainer__ema__enabled=True, trainer__ema__decay=0.5)
    ckpt = load_checkpoint(tmp_path / "checkpoints/last.pt")
    assert ckpt["ema"] is not None
    assert t.eval_model() is t.ema.module
    assert not same(t.ema.module.state_dict(), weights(t))


def test_warmup_and_cosine_schedule_reach_the_optimizer(tmp_path):
    t = run(tmp_path, sched__warmup_steps=5, sched__min_lr_ratio=0.1)
    lrs = [r["lr"] for r in t.state.history]
    assert lrs[-1] == pytest.approx(0.05 * 0.1, rel=1e-6)
    assert all(math.isfinite(x) for x in lrs)


class ConvTask(ToyAdaptationTask):
    """Images -> a small CNN: what trainer.channels_last acts on (4-D convolution weights)."""

    def build_datasets(self):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(32, 3, 16, 16, generator=g)
        y = x.mean((1, 2, 3))
        data = [(x[i], y[i], i % 2) for i in range(32)]
        return {"train": data, "val": data[:12]}

    def build_model(self):
        # no bias before BatchNorm: its gradient is rounding noise, which Adam would amplify
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))

    def build_aux_modules(self, model):
        return {}

    def train_loaders(self, datasets, make_loader):
        return {"source": make_loader(datasets["train"], train=True)}

    def training_step(self, model, batch, ctx):
        x, y, _ = batch
        return {"loss": nn.functional.mse_loss(model(x).squeeze(1), y)}

    def on_optimizer_step(self, model, ctx):
        pass


def run_conv(tmp_path, **trainer):
    cfg = make_cfg(tmp_path, **trainer)
    t = Trainer(cfg, ConvTask(cfg), tmp_path, make_fabric(cfg.trainer, console=None))
    t.setup()
    t.fit(None)
    return t


def test_channels_last_trains_the_same_model_in_nhwc(tmp_path):
    # SGD: Adam would scale the rounding differences of near-zero gradients up to full steps
    plain = run_conv(tmp_path / "plain", trainer__max_epochs=2, optim__name="sgd")
    nhwc = run_conv(tmp_path / "nhwc", trainer__max_epochs=2, optim__name="sgd", trainer__channels_last=True)
    conv = _unwrap(nhwc.model)[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert _unwrap(plain.model)[0].weight.is_contiguous()
    a, b = weights(plain), weights(nhwc)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    # the checkpoint loads into a model built the ordinary way
    fresh = ConvTask(make_cfg(tmp_path)).build_model()
    fresh.load_state_dict(load_checkpoint(tmp_path / "nhwc/checkpoints/last.pt")["model"])
    assert same(fresh.state_dict(), b)


@pytest.fixture
def restore_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cpu_threads_exact_count_and_every_core(tmp_path, restore_threads):
    import os

    cores = len(os.sched_getaffinity(0))
    run(tmp_path / "one", trainer__max_epochs=1, trainer__cpu_threads=1)
    assert torch.get_num_threads() == 1
    run(tmp_path / "all", trainer__max_epochs=1, trainer__cpu_threads=0, trainer__num_workers=1)
    assert torch.get_num_threads() == cores
    torch.set_num_threads(cores)
    run(tmp_path / "auto", trainer__max_epochs=1, trainer__num_workers=1)  # -1: leave the worker its core
    assert torch.get_num_threads() == max(1, cores - 1)


def test_cpu_threads_below_minus_one_is_a_user_error(tmp_path, restore_threads, monkeypatch):
    from podium.errors import UserError

    with pytest.raises(UserError, match="trainer.cpu_threads"):
        run(tmp_path, trainer__cpu_threads=-3)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # checked even when the environment decides
    with pytest.raises(UserError, match="trainer.cpu_threads"):
        run(tmp_path, trainer__cpu_threads=-3)


def test_ema_warmup_follows_the_formula_and_forgets_the_initial_weights():
    from torch.optim.swa_utils import AveragedModel

    from podium.engine.ema import ema_update

    live = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        live.weight.fill_(0.0)
    warm = AveragedModel(live, multi_avg_fn=ema_update(0.999, warmup=True))
    plain = AveragedModel(live, multi_avg_fn=ema_update(0.999, warmup=False))
    expected_warm, expected_plain = 0.0, 0.0
    for t in range(1, 301):  # the live weight jumps to 1 after the first (copying) update
        for ema in (warm, plain):
            ema.update_parameters(live)
        if t > 1:
            d = min(0.999, (1 + t - 1) / (10 + t - 1))  # n_averaged = t - 1 at the t-th call
            expected_warm = d * expected_warm + (1 - d) * 1.0
            expected_plain = 0.999 * expected_plain + 0.001 * 1.0
        with torch.no_grad():
            live.weight.fill_(1.0)
    assert warm.module.weight.item() == pytest.approx(expected_warm, rel=1e-5)
    assert plain.module.weight.item() == pytest.approx(expected_plain, rel=1e-5)
    # 300 updates: the warmed-up average has forgotten the initial 0, the plain one has not
    assert warm.module.weight.item() > 0.9 and plain.module.weight.item() < 0.3


def test_a_checkpoint_whose_ema_does_not_fit_is_a_user_error(tmp_path):
    from podium.engine.checkpoint import atomic_save
    from podium.errors import UserError

    run(tmp_path, trainer__ema__enabled=True, trainer__max_epochs=1)
    path = tmp_path / "checkpoints" / "last.pt"
    data = load_checkpoint(path)
    data["ema"] = {"module.other.weight": torch.zeros(2, 2), "n_averaged": torch.tensor(1)}
    atomic_save(data, path)
    cfg = make_cfg(tmp_path, trainer__ema__enabled=True)
    t = Trainer(cfg, ToyAdaptationTask(cfg), tmp_path, make_fabric(cfg.trainer, console=None))
    t.setup()
    with pytest.raises(UserError, match=r"last\.pt does not fit this run's model \(EMA weights\)"):
        t.load(path)
