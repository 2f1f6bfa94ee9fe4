"""Real 8-coil brain slice (ESPIRiT demo data): zero-filled vs classical parallel imaging vs a
VarNet trained only on simulated k-space, at 4x and 8x.

    python benchmarks/mri_real_slice.py --json bench-out/mri_real_slice.json
    python benchmarks/mri_real_slice.py --run-dir runs/<trained run>    # skip training
    python benchmarks/mri_real_slice.py --quick                          # smoke run
    python benchmarks/mri_real_slice.py --classical-only                 # no VarNet: classical rows only
    python benchmarks/mri_real_slice.py --choose-lambda                  # redo the CS weight rule (simulated)

Protocol (as ../shared/reference.md states it): the fully sampled slice
(`../shared/data/mri/espirit_brain_8ch.mat`, 320 x 256 x 8, phase columns 44-211 acquired) is
undersampled retrospectively with equispaced columns at offset (W // 2) % R plus an 8 % centre
block (the SNU-style mask); every reconstruction's magnitude is least-squares scaled to the
fully sampled root-sum-of-squares reference, then scored with fastMRI's SSIM (7 x 7 uniform
window, data range = reference maximum) and PSNR over the whole 320 x 256 image.

Methods: zero-filled; GRAPPA (k-space, calibrated on the centre block — handles the FOV
fold-over); CG-SENSE with one set of maps (fails on this folded slice, as the ESPIRiT paper
shows); the VarNet of `experiment=varnet_sim2real`, trained on the simulator only — the real
slice is never seen in training (only its measured noise level sets the simulator's range);
the same with readout-flip test-time augmentation (task.tta_readout_flip: the mean with the
reconstruction of the mirrored scan, whose sampled columns are the same); and that VarNet
fine-tuned on the slice's own undersampled k-space (zero-shot self-supervised
adaptation, tasks/reconstruction/adapt.py: held-out k-space points, never the reference, decide
when to stop).

Classical rows through sigpy (tasks/reconstruction/sigpy_recon.py; ESPIRiT, Uecker et al. 2014):
two-map ESPIRiT + SENSE, + L1-wavelet and + total-variation compressed sensing with the default
weights (chosen on simulated slices by `--choose-lambda`, never on this slice), one-map
L1-wavelet, and `cs_l1wavelet_two_map_reference_tuned`: the best of a weight grid scored against
this slice's reference — an upper bound, not a method.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, make_parser, print_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SLICE = (REPO / ".." / "shared" / "data" / "mri" / "espirit_brain_8ch.mat").resolve()
ACCELERATIONS = (4, 8)


def score(recon: np.ndarray, reference: np.ndarray) -> dict:
    from podium.tasks.reconstruction.classical import ls_scale
    from podium.tasks.reconstruction.metrics import psnr, ssim_fastmri

    scaled = ls_scale(np.abs(recon), reference)
    return {"ssim": ssim_fastmri(reference[None], scaled[None]), "psnr": psnr(reference[None], scaled[None])}


def classical_methods(kspace: np.ndarray, acc: int) -> dict[str, np.ndarray]:
    from podium.tasks.reconstruction import classical
    from podium.tasks.reconstruction.masks import SNUMask
    from podium.tasks.reconstruction.simulate import rss_image

    sampled = SNUMask([0.08], [acc])(kspace.shape[-1], np.random.default_rng(0))
    masked = kspace * sampled.mask[None, None, :]
    n = sampled.num_low_frequencies
    acs = ((kspace.shape[-1] - n + 1) // 2, (kspace.shape[-1] - n + 1) // 2 + n)
    out = {"zero_filled": classical.zero_filled(masked, sampled.mask)}
    # the regularisation is chosen per offset class by cross-validation on the calibration block
    filled = classical.grappa(masked, sampled.mask, acs, lamda=classical.GRAPPA_LAMDA_CANDIDATES)
    out["grappa"] = rss_image(filled)
    maps = classical.estimate_sensitivities(masked, acs)
    out["sense_one_map"] = np.abs(classical.sense(masked, sampled.mask, maps))
    return out


TUNED_GRID = (0.0003, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02)


def sigpy_methods(kspace: np.ndarray, acc: int, reference: np.ndarray, max_iter: int = 100,
                  grid=TUNED_GRID) -> tuple[dict[str, np.ndarray], dict]:
    """The sigpy rows (default weights), and the reference-tuned upper bound with its weight."""
    from podium.tasks.reconstruction import sigpy_recon as sr
    from podium.tasks.reconstruction.masks import SNUMask

    sampled = SNUMask([0.08], [acc])(kspace.shape[-1], np.random.default_rng(0))
    masked, mask = kspace * sampled.mask[None, None, :], sampled.mask
    maps = sr.espirit_maps(masked, sr.centre_block(mask, sampled.num_low_frequencies), sets=2)
    out = {"sense_two_map": sr.reconstruct(masked, mask, maps, "sense", max_iter=max_iter),
           "cs_l1wavelet_two_map": sr.reconstruct(masked, mask, maps, "l1wavelet", max_iter=max_iter),
           "cs_tv_two_map": sr.reconstruct(masked, mask, maps, "tv", max_iter=max_iter),
           "cs_l1wavelet_one_map": sr.reconstruct(masked, mask, maps[:1], "l1wavelet", max_iter=max_iter)}
    tuned = {lam: sr.reconstruct(masked, mask, maps, "l1wavelet", lam, max_iter=max_iter) for lam in grid}
    ssim = {lam: score(image, reference)["ssim"] for lam, image in tuned.items()}
    best = max(ssim, key=ssim.get)
    out["cs_l1wavelet_two_map_reference_tuned"] = tuned[best]
    return out, {"lamda": best, "grid_ssim": ssim, "default_lamda": dict(sr.DEFAULT_LAMBDA)}


def choose_lambdas(quick: bool) -> dict:
    """sigpy_recon.choose_lambda for the two CS methods: simulated slices only."""
    from podium.tasks.reconstruction import sigpy_recon as sr

    out = {}
    for method in ("l1wavelet", "tv"):
        start = time.perf_counter()
        best, means = sr.choose_lambda(method, grid=sr.LAMBDA_GRID[1:3] if quick else sr.LAMBDA_GRID,
                                       slices=1 if quick else 3, max_iter=10 if quick else 100)
        out[method] = {"best": best, "mean_ssim": means, "seconds": time.perf_counter() - start}
        print(f"{method}: lamda {best:g} ({sr.LAMBDA_RULE}); mean SSIM per lamda {means}", flush=True)
    return out


def train_varnet(overrides: list[str], run_root: Path) -> tuple[Path, float]:
    from rich.console import Console

    from podium.config import compose
    from podium.engine import session

    cfg = compose(["experiment=varnet_sim2real", "tracking=none", f"run.root={run_root}",
                   f"data.real_test=[{SLICE}]", *overrides])
    start = time.perf_counter()
    run_dir, _ = session.train(cfg, Console(stderr=True))
    return run_dir, time.perf_counter() - start


def varnet_reconstructions(run_dir: Path, kspace: np.ndarray, adapt_cfg=None) -> tuple[dict, dict]:
    """The trained model on the real slice, through the task's own sample path (make_sample);
    with `adapt_cfg`, also a copy fine-tuned on the slice's own undersampled k-space (zero-shot
    self-supervised adaptation: no reference image is used, the held-out k-space points decide
    when to stop)."""
    import torch
    from rich.console import Console

    from podium.engine.session import trainer_for_run
    from podium.tasks.reconstruction.adapt import adapt_to_scan
    from podium.tasks.reconstruction.data import make_sample
    from podium.tasks.reconstruction.masks import SNUMask
    from podium.tasks.reconstruction.task import readout_flip_average

    trainer, _ = trainer_for_run(run_dir, [], Console(stderr=True), "best")
    model = trainer.eval_model().eval()
    out, info = {}, {}
    for acc in ACCELERATIONS:
        sampled = SNUMask([0.08], [acc])(kspace.shape[-1], np.random.default_rng(0))
        sample = make_sample(kspace, sampled, None, max_value=None, recon_size=kspace.shape[-2:],
                             fg_threshold=0.0, volume=0, slice_index=0, index=0, anatomy=0)
        batch = {k: v[None].to(trainer.fabric.device) for k, v in sample.items()}
        scale = float(sample["scale"])
        args = (batch["masked_kspace"], batch["mask"], batch["num_low_frequencies"])
        with torch.no_grad():
            out[acc] = {name: readout_flip_average(model, *args, flip)[0].float().cpu().numpy() * scale
                        for name, flip in (("varnet_simulated", False), ("varnet_simulated_flip_tta", True))}
        if adapt_cfg is not None and adapt_cfg.steps > 0:
            start = time.perf_counter()
            result = adapt_to_scan(getattr(model, "module", model), batch["masked_kspace"], batch["mask"],
                                   batch["num_low_frequencies"], adapt_cfg)
            with torch.no_grad():
                image = trainer.task.reconstruct(result.model, batch)[0].float().cpu().numpy() * scale
            out[acc]["varnet_adapted"] = image
            info[f"acc{acc}"] = {"seconds": time.perf_counter() - start, "best_step": result.best_step,
                                 "steps_run": result.steps_run,
                                 "val_loss": [h for h in result.history if "val_loss" in h]}
    return out, info


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--run-dir", type=Path, default=None, help="a trained varnet_sim2real run (skip training)")
    parser.add_argument("--override", action="append", default=[], help="config override for training")
    parser.add_argument("--run-root", type=Path, default=REPO / "runs" / "bench")
    parser.add_argument("--adapt-steps", type=int, default=150,
                        help="self-supervised adaptation steps on the slice's own k-space (0: off)")
    parser.add_argument("--adapt-lr", type=float, default=None, help="adaptation learning rate (default: AdaptConfig's)")
    parser.add_argument("--classical-only", action="store_true", help="skip the VarNet (training and inference)")
    parser.add_argument("--choose-lambda", action="store_true",
                        help="rerun the CS weight rule on simulated slices (sigpy_recon.choose_lambda) and stop")
    args = parser.parse_args()
    result = {"benchmark": "mri_real_slice", "machine": machine_info(), "data": str(SLICE)}
    if args.choose_lambda:
        result["choose_lambda"] = choose_lambdas(args.quick)
        write_json(args.json, result)
        return
    if not SLICE.exists():
        result["skipped"] = f"{SLICE} not found"
        print(result["skipped"])
        write_json(args.json, result)
        return

    from podium.tasks.reconstruction.rawfiles import read_kspace_file
    from podium.tasks.reconstruction.simulate import measure_noise_ratio, rss_image

    kspace = read_kspace_file(SLICE)  # (8, 320, 256)
    reference = rss_image(kspace)
    result["noise_ratio_measured"] = measure_noise_ratio(kspace)
    recons = {acc: classical_methods(kspace, acc) for acc in ACCELERATIONS}
    result["reference_tuned"] = {}
    for acc in ACCELERATIONS:
        images, result["reference_tuned"][f"acc{acc}"] = sigpy_methods(
            kspace, acc, reference, max_iter=10 if args.quick else 100,
            grid=TUNED_GRID[1:4:2] if args.quick else TUNED_GRID)
        recons[acc].update(images)
    if not args.classical_only:
        _add_varnet(args, kspace, recons, result)
    _report(args, recons, reference, result)


def _add_varnet(args, kspace: np.ndarray, recons: dict, result: dict) -> None:
    overrides = list(args.override)
    if args.quick:
        overrides += ["trainer.max_epochs=1", "data.train_size=2", "data.val_slices=1", "data.shape=[96,80]",
                      "model.cascades=1", "model.chans=4", "model.sens_chans=2", "model.pools=2", "model.sens_pools=2"]
    run_dir, seconds = (args.run_dir, None) if args.run_dir else train_varnet(overrides, args.run_root)
    result.update({"run_dir": str(run_dir), "train_seconds": seconds, "overrides": overrides})
    from podium.tasks.reconstruction.adapt import AdaptConfig

    adapt_cfg = AdaptConfig(steps=2 if args.quick else args.adapt_steps, val_every=1 if args.quick else 5)
    if args.adapt_lr is not None:
        adapt_cfg.lr = args.adapt_lr
    networks, result["adaptation"] = varnet_reconstructions(run_dir, kspace, adapt_cfg)
    result["adaptation_config"] = vars(adapt_cfg)
    for acc, images in networks.items():
        recons[acc].update(images)


def _report(args, recons: dict, reference: np.ndarray, result: dict) -> None:
    rows, figures = [], {}
    for acc in ACCELERATIONS:
        for method, recon in recons[acc].items():
            s = score(recon, reference)
            figures[f"{method}_acc{acc}"] = s
            label = method + (" (upper bound: weight tuned on the reference)" if method.endswith("_reference_tuned") else "")
            rows.append([f"{acc}x", label, f"{s['ssim']:.4f}", f"{s['psnr']:.2f}"])
    result["figures"] = figures
    result["goal"] = {"ssim_acc4": 0.82, "ssim_acc8": 0.78}
    print_table("real ESPIRiT slice (fastMRI SSIM, LS-scaled)", ["accel", "method", "SSIM", "PSNR"], rows)
    plot = args.json.with_suffix(".png") if args.json else REPO / "bench-out" / "mri_real_slice.png"
    _plot(recons, reference, plot)
    result["plot"] = str(plot)
    write_json(args.json, result)


def _plot(recons: dict, reference: np.ndarray, path: Path) -> None:
    from podium.common.plots import new_figure, save_figure
    from podium.tasks.reconstruction.classical import ls_scale

    methods = list(recons[ACCELERATIONS[0]])
    fig = new_figure((2.6 * (len(methods) + 1), 3.2 * len(ACCELERATIONS)))
    for r, acc in enumerate(ACCELERATIONS):
        panels = [("reference", reference)] + [(m, ls_scale(np.abs(recons[acc][m]), reference)) for m in methods]
        for c, (name, image) in enumerate(panels):
            ax = fig.add_subplot(len(ACCELERATIONS), len(panels), r * len(panels) + c + 1)
            ax.imshow(image, cmap="gray", vmin=0, vmax=reference.max())
            ax.set_title(f"{name} {acc}x" if c else name, fontsize=8)
            ax.axis("off")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
