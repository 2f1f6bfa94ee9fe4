"""DRIVE vessels: does the encoder's initialisation matter, and does the reconstruction head help?

    python benchmarks/drive_init.py --json bench-out/drive_init.json
    python benchmarks/drive_init.py --quick --json out.json          # a smoke run (minutes)
    python benchmarks/drive_init.py --epochs 20 --pretrain-epochs 60  # a longer CPU budget

Protocol (fixed, stated in the JSON): the 20 DRIVE training images are split by
`experiment=drive_unet` (split_seed 0) into 5 test, 2 validation and 13 training images; the
validation images are carved from the training images, the test images are scored once, on the
best-on-validation checkpoint. Four variants train with the same budget and seed:

- random:        U-Net (resnet10t encoder) from random init
- random+recon:  the same with the auxiliary reconstruction decoder (task.recon_loss_weight)
- moco:          the encoder initialised from MoCo v2 pretraining (`podium pretrain
                 experiment=drive_moco`) on the 15 non-test images, without their labels; an
                 instance is a random 192 x 192 region, both 96 x 96 views are cut from it
- moco+recon:    both

Figures: test Dice (F1 at 0.5), pooled AUC-ROC and AUPR inside the field of view, the wall time
of each part. Skips cleanly (JSON says why) when ../shared/data/drive is absent.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, make_parser, print_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data" / "drive" / "training").resolve()
VARIANTS = {"random": [], "random+recon": ["model.recon_head=true"],
            "moco": ["model.encoder_weights={encoder}"],
            "moco+recon": ["model.encoder_weights={encoder}", "model.recon_head=true"]}


def podium(args: list[str]) -> float:
    """Run a podium command in a fresh process (as a user would); return its wall time."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "podium", *args], check=True, cwd=REPO)
    return time.perf_counter() - start


def train(overrides: list[str]) -> tuple[dict, float]:
    """One fine-tuning run in this process (the same code path as `podium train`)."""
    from rich.console import Console

    from podium.config import compose
    from podium.engine import session

    start = time.perf_counter()
    _, metrics = session.train(compose(overrides), Console(stderr=True))
    return metrics, time.perf_counter() - start


def non_test_folder(root: Path, run_dir: Path) -> tuple[Path, list[str]]:
    """A folder of links to the training + validation images of the drive_unet split: MoCo
    pretrains on them without labels; the test images are never seen."""
    from podium.config import compose
    from podium.engine import registry

    cfg = compose(["experiment=drive_unet", f"data.root={root}", "tracking=none", f"run.dir={run_dir}"])
    splits = registry.build("dataset", "drive", cfg.data, seed=0)
    folder = run_dir / "pretrain_images"
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(r.image_path.name for s in ("train", "val") for r in splits[s].records)
    for name in names:
        link = folder / name
        if not link.exists():
            link.symlink_to(root / "images" / name)
    return folder, names


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=40, help="fine-tuning epochs per variant")
    parser.add_argument("--pretrain-epochs", type=int, default=40, help="MoCo pretraining epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=None, help="keep the runs here")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    parser.add_argument("--pretrain-override", action="append", default=[], help="extra podium pretrain override")
    args = parser.parse_args()
    result: dict = {"machine": machine_info(), "data": str(DATA),
                    "split": "drive_unet split_seed 0: 13 train / 2 val (carved from train) / 5 test",
                    "model": "seg_unet_small (resnet10t encoder), 96 x 96 patches, Dice + CE"}
    if not DATA.is_dir():
        result["skipped"] = f"{DATA} is absent"
        print(result["skipped"])
        if args.json:
            write_json(args.json, result)
        return
    out = args.out_dir or Path(tempfile.mkdtemp(prefix="drive-init-"))
    out.mkdir(parents=True, exist_ok=True)
    common = [f"data.root={DATA}", "tracking=none", f"seed={args.seed}", "trainer.progress_bar=false"]
    epochs, pre_epochs = (1, 2) if args.quick else (args.epochs, args.pretrain_epochs)
    quick = ["data.patches_per_image=2", "data.max_images=2"] if args.quick else []

    folder, images = non_test_folder(DATA, out / "split")
    pre_dir = out / "pretrain"
    # CPU-sized MoCo: the fine-tuning encoder (resnet10t), 96 x 96 crops like the patches
    pretrain = ["model.backbone=resnet10t", "data.crop_size=[96,96]", "data.instance_size=[192,192]",
                "trainer.batch_size=32", "data.val_count=2",
                *(["data.repeats=2"] if args.quick else []), *args.pretrain_override]
    result["pretrain"] = {"images": images, "epochs": pre_epochs, "overrides": pretrain,
                          "wall_s": podium(["pretrain", "experiment=drive_moco", *common, f"data.root={folder}",
                                            *pretrain, f"trainer.max_epochs={pre_epochs}", f"run.dir={pre_dir}"])}
    encoder = pre_dir / "encoder.pt"
    result["variants"] = {}
    chosen = [v.strip() for v in args.variants.split(",")]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    for name, overrides in VARIANTS.items():
        if name not in chosen:
            continue
        run_dir = out / name.replace("+", "_")
        applied = [o.format(encoder=encoder) for o in overrides]
        metrics, wall = train(["experiment=drive_unet", *common, *quick, f"trainer.max_epochs={epochs}", *applied,
                               f"run.dir={run_dir}"])
        result["variants"][name] = {"overrides": applied, "wall_s": wall, "epochs": epochs,
                                    **{k: v for k, v in metrics.items() if k.startswith(("test/", "val/"))}}

    rows = [(name, f"{v.get('test/dice', float('nan')):.4f}", f"{v.get('test/auc_roc', float('nan')):.4f}",
             f"{v.get('test/aupr', float('nan')):.4f}", f"{v['wall_s'] / 60:.1f} min")
            for name, v in result["variants"].items()]
    base = result["variants"].get("random", {})
    result["ratios_vs_random"] = {name: {m: v[f"test/{m}"] / base[f"test/{m}"] for m in ("dice", "auc_roc", "aupr")
                                         if f"test/{m}" in v and base.get(f"test/{m}")}
                                  for name, v in result["variants"].items()}
    print_table("DRIVE vessels: test images (5), inside the field of view",
                ["init", "Dice", "AUC-ROC", "AUPR", "train time"], rows,
                caption=f"{epochs} epochs each; MoCo pretraining {pre_epochs} epochs, "
                        f"{result['pretrain']['wall_s'] / 60:.1f} min")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
