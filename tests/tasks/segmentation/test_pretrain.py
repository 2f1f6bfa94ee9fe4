"""MoCo v2 / SimCLR pretraining (`podium pretrain`): the losses against hand and reference
computations, the queue and the momentum update, SplitBatchNorm, the two views, the encoder
export into the U-Net, the CLI end to end with resume and bad input, and the gathering of keys
across two gloo processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from podium.cli import app
from podium.common.unet import build_unet, load_local_weights
from podium.engine.loading import SeededDataset
from podium.engine.parallel import concat_all_gather
from podium.engine.registry import build
from podium.errors import UserError
from podium.tasks.segmentation import pretrain as pt
from podium.tasks.segmentation.pretrain_data import (
    UnlabelledImagesConfig,
    unlabelled_images,
)

TINY = ["experiment=moco_synthetic", "data.crop_size=[32,32]", "data.val_count=2", "data.repeats=2",
        "trainer.batch_size=4", "model.backbone=resnet10t", "model.bn_splits=2", "task.queue_size=64",
        "trainer.num_workers=0", "tracking=none", "trainer.progress_bar=false"]


def write_images(folder: Path, count: int, size: int = 40, suffix: str = ".png") -> Path:
    """Images with a few random rectangles, so crops and colour jitter have something to change."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        arr = np.full((size, size, 3), rng.integers(0, 255, 3), np.uint8)
        for _ in range(4):
            y, x = rng.integers(0, size - 8, 2)
            arr[y:y + rng.integers(4, 12), x:x + rng.integers(4, 12)] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(folder / f"img{i}{suffix}")
    return folder


def data_args(folder: Path) -> list[str]:
    return [f"data.root={folder}", "data.synthetic=0", "data.patterns=[*.png]"]


# ---- losses -------------------------------------------------------------------------------


def test_info_nce_matches_a_hand_computed_value():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # (D, K): negatives (0, 1) and (-1, 0)
    t = 0.5
    loss, logits = pt.info_nce(q, k, queue, t)
    # logits = [0.6, 0, -1] / 0.5; loss = -log softmax[0]
    expected = -math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(0.0) + math.exp(-2.0)))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert logits[0].tolist() == pytest.approx([1.2, 0.0, -2.0])


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR's loss written out: anchor i of the 2N views, positive its pair, others negatives."""
    z = torch.cat([z1, z2])
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        sims = [torch.dot(z[i], z[k]) / t for k in range(2 * n) if k != i]
        total = total - (torch.dot(z[i], z[j]) / t - torch.logsumexp(torch.stack(sims), 0))
    return total / (2 * n)


def test_nt_xent_matches_the_reference_computation():
    g = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    z2 = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    loss, _ = pt.nt_xent(z1, z2, 0.3)
    assert loss.item() == pytest.approx(nt_xent_reference(z1, z2, 0.3).item(), rel=1e-5)
    loss_same, top1_same = pt.nt_xent(z1, z1.clone(), 0.3)  # identical views: every positive ranks first
    assert top1_same.item() == 1.0 and loss_same < loss


# ---- queue, momentum, split BN ------------------------------------------------------------


class Tiny(nn.Module):
    out_dim = 3

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 3)


def test_queue_enqueue_wraps_around_and_keeps_the_newest():
    state = pt.MomentumQueue(Tiny(), queue_size=5, momentum=0.9)
    assert state.queue.shape == (3, 5)
    keys = torch.arange(9.0).view(3, 3)  # 3 keys of dim 3
    state.enqueue(keys)
    state.enqueue(keys + 100)
    assert int(state.queue_ptr) == 1 and int(state.filled) == 5
    # slots 3, 4 hold the first two new keys, slot 0 the third (wrapped), 1-2 the first batch
    torch.testing.assert_close(state.queue[:, 3], keys[0] + 100)
    torch.testing.assert_close(state.queue[:, 0], keys[2] + 100)
    torch.testing.assert_close(state.queue[:, 1], keys[1])
    many = torch.arange(21.0).view(7, 3)  # more keys than slots: only the last 5 are kept
    state.enqueue(many)
    assert int(state.queue_ptr) == 1
    assert sorted(state.queue[0].tolist()) == sorted(many[2:, 0].tolist())


def test_momentum_update_follows_the_formula():
    query = Tiny()
    state = pt.MomentumQueue(query, queue_size=4, momentum=0.9)
    assert not any(p.requires_grad for p in state.key_encoder.parameters())
    with torch.no_grad():
        for p in query.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in state.key_encoder.state_dict().items()}
    state.momentum_update(query)
    for name, q in query.named_parameters():
        expected = 0.9 * before[name] + 0.1 * q.detach()
        torch.testing.assert_close(state.key_encoder.get_parameter(name), expected)


def test_split_batch_norm_normalises_groups_separately():
    bn = pt.SplitBatchNorm(2, num_splits=2)
    x = torch.randn(4, 2, 3, 3)
    x[1::2] += 5.0  # group 1 (samples 1, 3) has another mean than group 0
    out = bn(x)
    for group in (out[0::2], out[1::2]):
        assert group.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert set(bn.state_dict()) == set(nn.BatchNorm2d(2).state_dict())
    model = pt.convert_split_bn(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)), 4)
    assert isinstance(model[1], pt.SplitBatchNorm) and model[1].num_splits == 4
    bn.eval()
    ref = nn.BatchNorm2d(2).eval()
    ref.load_state_dict(bn.state_dict())
    torch.testing.assert_close(bn(x), ref(x))


# ---- data ---------------------------------------------------------------------------------


def test_views_differ_but_are_deterministic_for_seed_epoch_index(tmp_path):
    folder = write_images(tmp_path / "imgs", 5)
    cfg = UnlabelledImagesConfig(root=str(folder), crop_size=[24, 24], val_count=2, repeats=3)
    splits = unlabelled_images(cfg, seed=0)
    assert len(splits["train"]) == 9 and len(splits["val"]) == 2
    seeded = SeededDataset(splits["train"], seed=7)
    a, again, other_epoch = seeded[(4, 0)], seeded[(4, 0)], seeded[(4, 1)]
    assert a["view1"].shape == (3, 24, 24) and a["view1"].dtype == torch.float32
    assert not torch.equal(a["view1"], a["view2"])
    torch.testing.assert_close(a["view1"], again["view1"])
    torch.testing.assert_close(a["view2"], again["view2"])
    assert not torch.equal(a["view1"], other_epoch["view1"])
    assert int(a["index"]) == 4 % 3


def test_instance_regions_cut_both_views_from_one_region(tmp_path, monkeypatch):
    """With data.instance_size, an item is a random region and both views come from it: in an
    image whose halves differ, a region's brightness says where it was cut."""
    folder = tmp_path / "halves"
    folder.mkdir()
    for i in range(4):
        arr = np.zeros((32, 64, 3), np.uint8)
        arr[:, 32:] = 255  # left half black, right half white
        Image.fromarray(arr).save(folder / f"img{i}.png")
    # crop_scale 1 on a square region: each view is the whole region (resized, maybe flipped),
    # so both views of an item have exactly the same brightness -- unless they came from
    # different regions
    cfg = UnlabelledImagesConfig(root=str(folder), patterns=["*.png"], crop_size=[16, 16], crop_scale=[1.0, 1.0],
                                 instance_size=[32, 32], jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
                                 val_count=2, repeats=40, mean=[0.0] * 3, std=[1.0] * 3)
    seeded = SeededDataset(unlabelled_images(cfg, seed=0)["train"], seed=0)
    pairs = [(seeded[(i, 0)]["view1"].mean().item(), seeded[(i, 0)]["view2"].mean().item()) for i in range(40)]
    assert max(abs(a - b) for a, b in pairs) < 1e-6
    assert np.std([a for a, _ in pairs]) > 0.2  # regions move across the image
    with pytest.raises(UserError, match="instance_size"):
        unlabelled_images(UnlabelledImagesConfig(root=str(folder), patterns=["*.png"], instance_size=[48, 48],
                                                 val_count=2), seed=0)
    with pytest.raises(UserError, match="instance_size"):
        unlabelled_images(UnlabelledImagesConfig(root=str(folder), patterns=["*.png"], instance_size=[16, 0],
                                                 val_count=2), seed=0)


def test_bad_data_config_names_the_problem(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        unlabelled_images(UnlabelledImagesConfig(root=str(tmp_path / "missing")), seed=0)
    folder = write_images(tmp_path / "imgs", 3)
    with pytest.raises(UserError, match=r"no images match data.patterns=\['\*.tif'\]"):
        unlabelled_images(UnlabelledImagesConfig(root=str(folder), patterns=["*.tif"]), seed=0)
    with pytest.raises(UserError, match="val_count"):
        unlabelled_images(UnlabelledImagesConfig(root=str(folder), val_count=3), seed=0)
    (folder / "broken.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="broken.png"):
        unlabelled_images(UnlabelledImagesConfig(root=str(folder), val_count=2), seed=0)


# ---- export into the U-Net ----------------------------------------------------------------


def test_encoder_export_loads_every_tensor_into_the_unet(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(pt.ContrastiveEncoderConfig(backbone="resnet10t", bn_splits=2))
    model = build("model", "moco_encoder", cfg, in_chans=3)
    assert isinstance(model.backbone.bn1, pt.SplitBatchNorm)
    path = tmp_path / "encoder.pt"
    torch.save(pt.encoder_state_dict(model.state_dict()), path)
    unet = build_unet("encoder", "resnet10t", 3, 2, 5, [256, 128, 64, 32, 16], 1)
    encoder = unet.encoder.model
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tensor left at random init warns
        load_local_weights(encoder, str(path), "encoder_weights", 3)
    source = model.backbone.state_dict()
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, source[key.replace("_", ".") if key not in source else key])


# ---- CLI end to end -----------------------------------------------------------------------


def test_pretrain_cli_writes_an_encoder_the_unet_loads(tmp_path):
    folder = write_images(tmp_path / "imgs", 6)
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["pretrain", *TINY, *data_args(folder), "trainer.max_epochs=1",
                                      f"run.dir={run_dir}"])
    assert result.exit_code == 0, result.output
    assert f"model.encoder_weights={run_dir / 'encoder.pt'}" in result.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"val/loss", "val/top1"} <= set(metrics)
    unet = build("model", "seg_unet", _seg_model_cfg(run_dir / "encoder.pt"), num_classes=2, in_chans=3)
    state = torch.load(run_dir / "encoder.pt", weights_only=True)
    torch.testing.assert_close(unet.unet.encoder.model.conv1[0].weight, state["conv1.0.weight"])
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert int(ckpt["aux"]["moco"]["filled"]) == 4 * 2  # two steps of 4 keys (8 items, batch 4)

    simclr = CliRunner().invoke(app, ["pretrain", *TINY, *data_args(folder), "task.method=simclr",
                                      "trainer.max_steps=1", f"run.dir={tmp_path / 'simclr'}"])
    assert simclr.exit_code == 0, simclr.output
    assert torch.load(tmp_path / "simclr/checkpoints/last.pt", weights_only=True)["aux"] == {}  # no queue
    assert (tmp_path / "simclr" / "encoder.pt").is_file()


def _seg_model_cfg(weights: Path):
    from omegaconf import OmegaConf

    return OmegaConf.create({"name": "seg_unet", "encoder": "resnet10t", "encoder_weights": str(weights),
                             "decoder_channels": [16, 16, 16, 16, 16], "encoder_depth": 5,
                             "recon_head": False, "recon_channels": 16})


def test_bad_input_exits_2_with_a_clear_message(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["pretrain", *TINY, f"data.root={tmp_path / 'nope'}"])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    folder = write_images(tmp_path / "imgs", 4)
    nothing = runner.invoke(app, ["pretrain", *TINY, f"data.root={folder}", "data.patterns=[*.jpg]"])
    assert nothing.exit_code == 2 and "no images match" in nothing.output
    (folder / "corrupt.png").write_bytes(b"\x89PNG garbage")
    corrupt = runner.invoke(app, ["pretrain", *TINY, *data_args(folder), f"run.dir={tmp_path / 'r'}"])
    assert corrupt.exit_code == 2 and "corrupt.png" in corrupt.output
    wrong_task = runner.invoke(app, ["pretrain", "experiment=digits"])
    assert wrong_task.exit_code == 2 and "task=moco" in wrong_task.output
    method = runner.invoke(app, ["pretrain", *TINY, "task.method=byol"])
    assert method.exit_code == 2 and "task.method" in method.output


def test_resume_continues_exactly_where_the_interrupted_run_stopped(tmp_path, monkeypatch):
    folder = write_images(tmp_path / "imgs", 6)
    args = [*TINY, *data_args(folder), "trainer.max_epochs=2", "sched=none"]
    runner = CliRunner()
    full = runner.invoke(app, ["pretrain", *args, f"run.dir={tmp_path / 'full'}"])
    assert full.exit_code == 0, full.output

    original, calls = pt.ContrastivePretrainTask.training_step, {"n": 0}

    def interrupted(self, model, batch, ctx):
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C before the third step: two steps are done and saved
            raise KeyboardInterrupt
        return original(self, model, batch, ctx)

    monkeypatch.setattr(pt.ContrastivePretrainTask, "training_step", interrupted)
    part = runner.invoke(app, ["pretrain", *args, f"run.dir={tmp_path / 'part'}"])
    assert part.exit_code == 130, part.output
    saved = torch.load(tmp_path / "part/checkpoints/last.pt", weights_only=True)
    assert saved["state"]["step"] == 2 and int(saved["aux"]["moco"]["filled"]) == 8
    monkeypatch.setattr(pt.ContrastivePretrainTask, "training_step", original)
    resumed = runner.invoke(app, ["pretrain", f"resume={tmp_path / 'part'}"])
    assert resumed.exit_code == 0, resumed.output

    a = torch.load(tmp_path / "full/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "part/checkpoints/last.pt", weights_only=True)
    assert a["state"]["step"] == b["state"]["step"] == 4
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key])
    for key in a["aux"]["moco"]:
        torch.testing.assert_close(b["aux"]["moco"][key], a["aux"]["moco"][key])
    torch.testing.assert_close(torch.load(tmp_path / "part/encoder.pt", weights_only=True)["conv1.0.weight"],
                               torch.load(tmp_path / "full/encoder.pt", weights_only=True)["conv1.0.weight"])


# ---- two processes ------------------------------------------------------------------------


def _task_cfg():
    from omegaconf import OmegaConf

    return OmegaConf.create({"seed": 0, "task": OmegaConf.structured(pt.PretrainTaskConfig()),
                             "loss": {"name": "contrastive", "temperature": 0.2}})


def _gather_worker(rank: int, world: int, port: int, out: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        keys = torch.full((2, 3), float(rank + 1))
        gathered = concat_all_gather(keys)
        state = pt.MomentumQueue(Tiny(), queue_size=8, momentum=0.9)
        state.queue.zero_()
        state.enqueue(gathered)
        # NT-Xent split over two ranks == NT-Xent of the whole batch on one process
        g = torch.Generator().manual_seed(0)
        z1 = F.normalize(torch.randn(4, 5, generator=g), dim=1)
        z2 = F.normalize(torch.randn(4, 5, generator=g), dim=1)
        local1 = z1[rank * 2:(rank + 1) * 2].clone().requires_grad_(True)
        local2 = z2[rank * 2:(rank + 1) * 2].clone().requires_grad_(True)
        loss, _ = pt.nt_xent(local1, local2, 0.5)
        loss.backward()
        # shuffled BN across ranks: a per-sample encoder gives the keys of the unshuffled batch
        images = torch.randn(6, 2, generator=g)  # 3 per rank
        torch.manual_seed(0)  # the same encoder on both ranks, as DDP guarantees
        encoder = nn.Linear(2, 3)
        task = pt.ContrastivePretrainTask(_task_cfg())
        all_keys, local_keys = task.keys(encoder, images[rank * 3:(rank + 1) * 3], SimpleNamespace(step=5))
        torch.save({"gathered": gathered, "queue": state.queue, "ptr": state.queue_ptr, "loss": loss.detach(),
                    "grad1": local1.grad, "grad2": local2.grad, "all_keys": all_keys,
                    "local_keys": local_keys, "expected_keys": encoder(images).detach()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_keys_and_embeddings_are_gathered_across_two_gloo_processes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    expected = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)])
    for r in (r0, r1):
        torch.testing.assert_close(r["gathered"], expected)
        torch.testing.assert_close(r["queue"][:, :4], expected.T)  # both ranks' keys, same queue
        assert int(r["ptr"]) == 4
    g = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(4, 5, generator=g), dim=1).requires_grad_(True)
    z2 = F.normalize(torch.randn(4, 5, generator=g), dim=1).requires_grad_(True)
    full, _ = pt.nt_xent(z1, z2, 0.5)
    full.backward()
    for rank, r in enumerate((r0, r1)):
        torch.testing.assert_close(r["all_keys"], r["expected_keys"])
        torch.testing.assert_close(r["local_keys"], r["expected_keys"][rank * 3:(rank + 1) * 3])
    assert ((r0["loss"] + r1["loss"]) / 2).item() == pytest.approx(full.item(), rel=1e-5)
    # each rank's gradient holds every rank's loss terms (summed): 2x the mean loss's gradient
    torch.testing.assert_close(torch.cat([r0["grad1"], r1["grad1"]]) / 2, z1.grad)
    torch.testing.assert_close(torch.cat([r0["grad2"], r1["grad2"]]) / 2, z2.grad)


@pytest.mark.slow
def test_ddp_pretrain_with_two_cpu_processes_enqueues_both_ranks_keys(tmp_path):
    folder = write_images(tmp_path / "imgs", 6)
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "podium", "pretrain", *TINY, *data_args(folder),
                           "trainer.max_steps=1", "trainer.devices=2", "trainer.accelerator=cpu",
                           f"run.dir={run_dir}"], check=False, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    aux = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["aux"]["moco"]
    assert int(aux["queue_ptr"]) == int(aux["filled"]) == 2 * 4  # world size x batch per rank
    assert (run_dir / "encoder.pt").is_file()


DRIVE_IMAGES = (Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "drive" / "training"
                / "images").resolve()


@pytest.mark.realdata
@pytest.mark.skipif(not DRIVE_IMAGES.is_dir(), reason=f"{DRIVE_IMAGES} is not available")
def test_default_experiment_pretrains_on_the_drive_images(tmp_path):
    """`podium pretrain` without experiment= is drive_moco: the DRIVE tifs with CLAHE (two steps,
    small crops and a small backbone, so it stays a smoke test)."""
    result = CliRunner().invoke(app, ["pretrain", f"data.root={DRIVE_IMAGES}", "data.crop_size=[48,48]",
                                      "model.backbone=resnet10t", "trainer.batch_size=8", "trainer.max_steps=2",
                                      "trainer.num_workers=0", "tracking=none", "trainer.progress_bar=false",
                                      f"run.dir={tmp_path / 'run'}"])
    assert result.exit_code == 0, result.output
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "name: drive_moco" in config and "clahe: lab" in config
    assert (tmp_path / "run" / "encoder.pt").is_file()
