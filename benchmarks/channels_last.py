"""Training-step time with convolution weights in NCHW (default) and NHWC (`trainer.channels_last`),
as ratios measured in one run, for the families' convolutional models.

    python benchmarks/channels_last.py --json bench-out/channels_last.json
    python benchmarks/channels_last.py --quick

oneDNN (CPU) and cuDNN (GPU) choose different convolution kernels for channels-last tensors; on
CPUs with AVX-512 the NHWC kernels are usually faster, but whether they are for a given model is
an empirical question — hence this benchmark rather than a default. Each case builds one model
and one optimizer, then alternates the two layouts (A B A B ...), converting the same model in
place between rounds, and reports the median step time of each and their ratio (> 1: NHWC faster).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, make_parser, median, print_table, write_json  # noqa: E402


def _compose(overrides: list[str]):
    from podium.config import compose

    return compose([*overrides, "tracking=none"])


def landmarks_c2f(quick: bool):
    """The ISBI coarse-to-fine model (isbi2015_c2f): 1024 x 832 input, batch 8."""
    import torch

    from podium.engine import registry

    cfg = _compose(["experiment=isbi2015_c2f"])
    model = registry.build("model", "coarse_to_fine", cfg.model, num_landmarks=19, in_chans=1)
    h, w, b = (512, 416, 2) if quick else (1024, 832, 8)
    x = torch.randn(b, 1, h, w)
    points = torch.rand(b, 19, 2) * torch.tensor([w - 1.0, h - 1.0])
    visible = torch.ones(b, 19, dtype=torch.bool)

    def loss():
        out = model(x, points, visible)
        return out["heatmaps"].float().logsumexp((-2, -1)).mean() + out["patch_heatmaps"].float().logsumexp((-2, -1)).mean()

    return f"landmarks coarse_to_fine {b}x1x{h}x{w}", model, loss


def segmentation_unet(quick: bool):
    """The DRIVE vessel U-Net (seg_unet, resnet18 encoder) on training patches."""
    import torch

    from podium.engine import registry

    cfg = _compose(["experiment=drive_unet"])
    model = registry.build("model", cfg.model.name, cfg.model, num_classes=2, in_chans=3)
    b, s = (2, 64) if quick else (8, 128)
    x = torch.randn(b, 3, s, s)
    target = torch.randint(0, 2, (b, s, s))

    def loss():
        out = model(x)
        logits = out["logits"] if isinstance(out, dict) else out
        return torch.nn.functional.cross_entropy(logits, target)

    return f"segmentation seg_unet {b}x3x{s}x{s}", model, loss


def classification_resnet(quick: bool):
    """A timm resnet18 classifier, the classification family's default backbone."""
    import timm
    import torch

    model = timm.create_model("resnet18", num_classes=16)
    b, s = (4, 64) if quick else (32, 128)
    x = torch.randn(b, 3, s, s)
    target = torch.randint(0, 16, (b,))

    def loss():
        return torch.nn.functional.cross_entropy(model(x), target)

    return f"classification resnet18 {b}x3x{s}x{s}", model, loss


def mri_varnet(quick: bool):
    """The CPU E2E-VarNet (varnet_cpu, 6 cascades / 12 channels) on one 8-coil 320 x 256 slice."""
    import torch

    from podium.tasks.reconstruction.models.varnet import VarNet

    cascades, (h, w) = (2, (64, 48)) if quick else (6, (320, 256))
    model = VarNet(num_cascades=cascades, chans=12, sens_chans=6, pools=4, sens_pools=3)
    kspace = torch.randn(1, 8, h, w, 2)
    mask = torch.zeros(1, 1, 1, w, 1)
    mask[..., ::4, :] = 1
    mask[..., w // 2 - 8: w // 2 + 8, :] = 1
    target = torch.rand(1, h, w)

    def loss():
        return (model(kspace * mask, mask, torch.tensor([16])) - target).abs().mean()

    return f"MRI varnet {cascades}/12/6 8x{h}x{w}", model, loss


CASES = (landmarks_c2f, segmentation_unet, classification_resnet, mri_varnet)


def time_case(build, quick: bool, rounds: int, steps: int) -> dict:
    import torch

    torch.manual_seed(0)
    name, model, loss_fn = build(quick)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()

    times: dict[str, list[float]] = {"nchw": [], "nhwc": []}
    for _ in range(rounds):
        for layout, fmt in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)):
            model.to(memory_format=fmt)
            step()  # warm-up: kernel selection for this layout
            for _ in range(steps):
                start = time.perf_counter()
                step()
                times[layout].append(time.perf_counter() - start)
    nchw, nhwc = median(times["nchw"]) * 1e3, median(times["nhwc"]) * 1e3
    return {"case": name, "nchw_ms": nchw, "nhwc_ms": nhwc, "speedup": nchw / nhwc,
            "steps_per_layout": len(times["nchw"])}


def main() -> None:
    args = make_parser(__doc__).parse_args()
    rounds, steps = (1, 1) if args.quick else (2, 3)
    results = [time_case(case, args.quick, rounds, steps) for case in CASES]
    print_table("Training step, NCHW vs channels-last (NHWC) weights",
                ["model", "NCHW ms", "NHWC ms", "speed-up"],
                [(r["case"], f"{r['nchw_ms']:.0f}", f"{r['nhwc_ms']:.0f}", f"{r['speedup']:.2f}x") for r in results],
                caption=f"median of {results[0]['steps_per_layout']} steps per layout, interleaved")
    if args.json:
        write_json(args.json, {"machine": machine_info(), "cases": results})


if __name__ == "__main__":
    main()
