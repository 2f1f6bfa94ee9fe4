"""End-to-end runs of the landmark-detection family through the CLI, on tiny CPU configs:
train / eval / predict on generated X-ray-like images, the coordinate-regression baseline,
metrics in millimetres of the original image, bad input (exit code 2, the file named, no
traceback) and a smoke run on the real ISBI 2015 copy (skipped without ../shared/data)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from podium.cli import app
from podium.tasks.landmarks.synthetic import write_synthetic_landmarks

REPO = Path(__file__).resolve().parents[3]
ISBI_ROOT = (REPO / ".." / "shared" / "data" / "isbi2015_ceph").resolve()

SPACING = 0.2  # mm per pixel: not the default 0.1, so a hard-coded spacing would show
K = 3  # landmarks of the generated data

# Small images letterboxed to a smaller input (scale 2/3 plus padding): an error measured in
# input pixels instead of original pixels would be off by 1.5x.
SYNTH_DATA = ["data.n_train=8", "data.n_val=3", "data.n_test=3", "data.size=[48,40]",
              "data.image_size=[32,32]", f"data.num_landmarks={K}", f"data.spacing={SPACING}"]
FAST = ["trainer.batch_size=4", "trainer.num_workers=0", "tracking=none",
        "trainer.progress_bar=false"]
SMALL_UNET = ["model.encoder=resnet10t", "model.encoder_depth=3", "model.decoder_channels=[16,16,16]"]


def synth_args(tmp: Path, epochs: int = 2) -> list[str]:
    return ["experiment=landmarks_synthetic", f"trainer.max_epochs={epochs}", *FAST, *SYNTH_DATA,
            f"data.root={tmp / 'gen'}", f"data.cache_dir={tmp / 'cache'}"]


def podium(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "podium", *args], check=False, capture_output=True,
                          text=True, timeout=timeout, env=env)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def generated_split(tmp: Path, split: str) -> Path:
    """The folder the synthetic dataset generated for `split` (gen-<hash>/<split>)."""
    (folder,) = (tmp / "gen").glob(f"gen-*/{split}")
    return folder


# ---- one trained synthetic run, shared by the tests that read it ----------------------------


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synth")
    run_dir = tmp / "run"
    result = CliRunner().invoke(app, ["train", *synth_args(tmp), *SMALL_UNET, f"run.dir={run_dir}"])
    assert result.exit_code == 0, result.output
    return tmp, run_dir


def test_train_writes_mm_metrics_plots_and_predictions(synth_run):
    _, run_dir = synth_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for split in ("val", "test"):
        for key in ("mre_mm", "mre_std_mm", "sdr_2mm", "sdr_2.5mm", "sdr_3mm", "sdr_4mm"):
            assert math.isfinite(metrics[f"{split}/{key}"]), f"{split}/{key}"
        for k in range(K):
            assert f"{split}/mre_mm/L{k}" in metrics
        assert 0 <= metrics[f"{split}/sdr_2mm"] <= metrics[f"{split}/sdr_4mm"] <= 1
        assert metrics[f"{split}/missing"] == 0
    assert metrics["test/mre_mm"] > 0

    plots = run_dir / "plots"
    for name in ("cumulative_error_test.png", "per_landmark_test.png", "cumulative_error_val.png"):
        assert (plots / name).is_file(), name
    overlays = sorted(p.name for p in plots.glob("overlay_test_*.png"))
    assert overlays == ["overlay_test_0000.png", "overlay_test_0001.png", "overlay_test_0002.png"]
    for p in plots.glob("*.png"):
        with Image.open(p) as img:
            img.verify()

    rows = read_csv(run_dir / "predictions" / "test.csv")
    names = [f"L{k}" for k in range(K)]
    assert list(rows[0]) == ["id", *[f"{n}_{a}" for n in names for a in ("x", "y")],
                             *[f"{n}_err_mm" for n in names]]
    assert [r["id"] for r in rows] == ["test/0000.png", "test/0001.png", "test/0002.png"]
    table = read_csv(run_dir / "predictions" / "per_landmark_test.csv")
    assert [r["landmark"] for r in table] == names
    assert list(table[0]) == ["landmark", "mre_mm", "std_mm", "sdr_2mm", "sdr_2.5mm", "sdr_3mm", "sdr_4mm",
                              "offset_x_mm", "offset_y_mm"]
    for k, row in enumerate(table):
        assert float(row["mre_mm"]) == pytest.approx(metrics[f"test/mre_mm/L{k}"], abs=1e-3)
        # the mean offset can never exceed the mean radial error
        assert math.hypot(float(row["offset_x_mm"]), float(row["offset_y_mm"])) <= float(row["mre_mm"]) + 1e-3


def test_eval_reproduces_the_test_metrics(synth_run):
    _, run_dir = synth_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--split", "test"])
    assert result.exit_code == 0, result.output
    evaluated = json.loads((run_dir / "eval" / "best" / "metrics.json").read_text())
    assert evaluated["test/mre_mm"] == pytest.approx(metrics["test/mre_mm"], abs=1e-6)
    assert evaluated["test/sdr_2mm"] == pytest.approx(metrics["test/sdr_2mm"], abs=1e-9)


@pytest.mark.parametrize("overrides", [["tta=flips"], ["tta=scales", "tta_scales=[0.75,1.0]"]])
def test_eval_with_tta_maps_points_back_to_the_image(synth_run, overrides):
    """podium.engine.tta on heatmaps: each view's heatmaps go back to the input frame (flips
    exactly, scales by resizing) before the decode, so the errors stay in the plain run's range."""
    _, run_dir = synth_run
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--split", "test", *overrides])
    assert result.exit_code == 0, result.output
    (folder,) = [p for p in (run_dir / "eval").iterdir()
                 if json.loads((p / "eval.json").read_text())["overrides"] == overrides]
    metrics = json.loads((folder / "metrics.json").read_text())
    plain = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(metrics["test/mre_mm"]) and metrics["test/mre_mm"] != plain["test/mre_mm"]
    # 48 x 40 images at 0.2 mm: a point mapped to the wrong corner would be ~6 mm away
    assert metrics["test/mre_mm"] < plain["test/mre_mm"] + 3.0


def test_predict_writes_px_and_mm_csv_json_and_overlays(synth_run):
    tmp, run_dir = synth_run
    test_dir = generated_split(tmp, "test")
    images = [test_dir / "0000.png", test_dir / "0001.png"]
    runner = CliRunner()

    out = tmp / "points.csv"
    result = runner.invoke(app, ["predict", str(run_dir), *map(str, images), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = read_csv(out)
    assert len(rows) == 2 and [Path(r["id"]).name for r in rows] == ["0000.png", "0001.png"]
    names = [f"L{k}" for k in range(K)]
    assert list(rows[0]) == ["id", *[f"{n}_{a}_px" for n in names for a in ("x", "y")],
                             *[f"{n}_{a}_mm" for n in names for a in ("x", "y")]]
    for row in rows:
        for n in names:
            for a in ("x", "y"):
                px, mm = float(row[f"{n}_{a}_px"]), float(row[f"{n}_{a}_mm"])
                assert mm == pytest.approx(px * SPACING, abs=2e-3), (n, a)
    for image in images:
        assert (tmp / "points_overlays" / f"{image.stem}.png").is_file()

    # the same images through the evaluation pipeline (best checkpoint): the same points
    evaluated = {r["id"]: r for r in read_csv(run_dir / "predictions" / "test.csv")}
    for row in rows:
        ref = evaluated[f"test/{Path(row['id']).name}"]
        for n in names:
            for a in ("x", "y"):
                assert float(row[f"{n}_{a}_px"]) == pytest.approx(float(ref[f"{n}_{a}"]), abs=0.02)

    out_json = tmp / "json" / "points.json"
    result = runner.invoke(app, ["predict", str(run_dir), *map(str, images), "--out", str(out_json)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out_json.read_text())
    assert doc["landmarks"] == names and len(doc["predictions"]) == 2
    for pred, row in zip(doc["predictions"], rows):
        assert np.shape(pred["points_px"]) == (K, 2) and np.shape(pred["points_mm"]) == (K, 2)
        np.testing.assert_allclose(pred["points_mm"], np.array(pred["points_px"]) * SPACING, atol=2e-3)
        np.testing.assert_allclose(np.ravel(pred["points_px"]),
                                   [float(row[f"{n}_{a}_px"]) for n in names for a in ("x", "y")], atol=1e-6)
        assert pred["spacing_mm"] == pytest.approx(SPACING)
    assert sorted(p.name for p in (tmp / "json" / "points_overlays").iterdir()) == ["0000.png", "0001.png"]


def test_metrics_are_original_image_millimetres(synth_run):
    """test/mre_mm is the mean of the err_mm columns, and those errors are the distances between
    the predicted ORIGINAL-pixel coordinates and the generator's labels (original pixels), times
    the spacing — not input pixels, not another spacing."""
    tmp, run_dir = synth_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = read_csv(run_dir / "predictions" / "test.csv")
    names = [f"L{k}" for k in range(K)]
    err_csv = np.array([[float(r[f"{n}_err_mm"]) for n in names] for r in rows])
    assert metrics["test/mre_mm"] == pytest.approx(err_csv.mean(), abs=1e-3)
    for k, n in enumerate(names):
        assert metrics[f"test/mre_mm/{n}"] == pytest.approx(err_csv[:, k].mean(), abs=1e-3)

    labels = {f"test/{r['image_path']}": r for r in read_csv(generated_split(tmp, "test") / "labels.csv")}
    assert set(labels) == {r["id"] for r in rows}
    err_labels = np.array([[math.hypot((float(r[f"{n}_x"]) - float(labels[r["id"]][f"{n}_x"])) * SPACING,
                                       (float(r[f"{n}_y"]) - float(labels[r["id"]][f"{n}_y"])) * SPACING)
                            for n in names] for r in rows])
    # the CSV rounds coordinates to 0.01 px and errors to 0.001 mm
    np.testing.assert_allclose(err_labels, err_csv, atol=3e-3)
    assert metrics["test/mre_mm"] == pytest.approx(err_labels.mean(), abs=1e-3)


# ---- the coordinate regression baseline --------------------------------------------------------


def test_coord_regressor_baseline_trains(tmp_path):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", *synth_args(tmp_path, epochs=1), "model=coord_regressor",
                                      "loss=coord_l1", "model.arch=resnet10t",
                                      f"run.dir={run_dir}"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(metrics["test/mre_mm"]) and math.isfinite(metrics["val/mre_mm"])
    assert 0 <= metrics["test/sdr_2mm"] <= 1
    rows = read_csv(run_dir / "predictions" / "test.csv")
    err = np.array([[float(r[f"L{k}_err_mm"]) for k in range(K)] for r in rows])
    assert metrics["test/mre_mm"] == pytest.approx(err.mean(), abs=1e-3)
    assert (run_dir / "plots" / "cumulative_error_test.png").is_file()


def test_experiment_accepts_the_coord_regressor_model():
    result = CliRunner().invoke(app, ["train", "--cfg", "experiment=landmarks_synthetic", "model=coord_regressor",
                                      "loss=coord_l1"])
    assert result.exit_code == 0, result.output
    assert "name: coord_regressor" in result.output


# ---- coarse-to-fine with the middle stage -------------------------------------------------------

C2F_MID = ["model=coarse_to_fine", "data.image_size=[64,64]", "model.coarse_factor=4", "model.mid_factor=2",
           "model.stage1.encoder=resnet10t", "model.stage1.encoder_depth=3",
           "model.stage1.decoder_channels=[16,16,16]", "model.refiner.patch_size=16", "model.mid.patch_size=16",
           "model.train_from_estimates=0.5"]


def test_coarse_to_fine_with_a_middle_stage_trains_and_evaluates(tmp_path):
    run_dir = tmp_path / "run"
    args = [a for a in synth_args(tmp_path, epochs=1) if not a.startswith("data.image_size")]
    result = CliRunner().invoke(app, ["train", *args, *C2F_MID, f"run.dir={run_dir}"])
    assert result.exit_code == 0, result.output
    history = read_csv(run_dir / "history.csv")
    assert math.isfinite(float(history[-1]["train/mid_refine_loss"]))
    assert math.isfinite(json.loads((run_dir / "metrics.json").read_text())["test/mre_mm"])
    bad = podium("train", *args, *C2F_MID, "model.mid_factor=4", f"run.dir={tmp_path / 'bad'}")
    assert bad.returncode == 2 and "model.mid_factor=4" in bad.stderr and "Traceback" not in bad.stderr


# ---- bad input: exit code 2, the file named, no traceback --------------------------------------

TABLE = ["experiment=landmarks_synthetic", "data=landmark_table", "trainer.max_epochs=1",
         *FAST, "data.image_size=[32,32]", *SMALL_UNET]


def _table(tmp: Path, edit) -> tuple[Path, Path]:
    """A valid generated train/val pair; `edit(rows, folder)` corrupts the train table's rows
    (lists of cells, header first). Returns (bad train CSV, val CSV)."""
    train = write_synthetic_landmarks(tmp / "train", 3, (48, 40), num_landmarks=2, seed=1)
    val = write_synthetic_landmarks(tmp / "val", 2, (48, 40), num_landmarks=2, seed=2)
    with train.open(newline="") as f:
        rows = list(csv.reader(f))
    edit(rows, train.parent)
    bad = train.parent / "bad_table.csv"
    with bad.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return bad, val


def _wrong_column_count(rows, folder):
    rows[2] = rows[2][:-1]


def _non_numeric(rows, folder):
    rows[2][3] = "twelve"


def _outside(rows, folder):
    rows[1][1] = "400"  # x of the first landmark, the image is 40 px wide


def _missing_image(rows, folder):
    rows[3][0] = "missing_image.png"


def _unreadable_image(rows, folder):
    (folder / "broken_image.png").write_bytes(b"not an image")
    rows[2][0] = "broken_image.png"


def _truncated_image(rows, folder):
    # a valid header (so the table reads) but no pixel data: fails at decode, inside training
    (folder / "truncated_image.png").write_bytes((folder / "0001.png").read_bytes()[:80])
    rows[2][0] = "truncated_image.png"


BAD_TABLES = {
    "wrong_column_count": (_wrong_column_count, ["bad_table.csv", "line 3"]),
    "non_numeric": (_non_numeric, ["bad_table.csv", "line 3", "twelve"]),
    "outside": (_outside, ["bad_table.csv", "line 2", "0000.png", "outside the image"]),
    "missing_image": (_missing_image, ["bad_table.csv", "line 4", "missing_image.png", "does not exist"]),
    "unreadable_image": (_unreadable_image, ["broken_image.png", "cannot read image"]),
    "truncated_image": (_truncated_image, ["truncated_image.png"]),
}


def _assert_user_error(result, expected: list[str], run_dir: Path):
    output = result.stderr if hasattr(result, "stderr") and result.stderr is not None else result.output
    code = getattr(result, "exit_code", getattr(result, "returncode", None))
    assert code == 2, output[-3000:]
    for text in expected:
        assert text in output, (text, output[-3000:])
    assert "Traceback" not in output
    assert not (run_dir / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_bad_landmark_table_exits_2_naming_the_file(tmp_path, case):
    edit, expected = BAD_TABLES[case]
    bad, val = _table(tmp_path, edit)
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", *TABLE, f"data.train={bad}", f"data.val={val}",
                                      f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={run_dir}"])
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught error
    _assert_user_error(result, expected, run_dir)


def test_unreadable_image_exits_2_in_a_subprocess(tmp_path):
    """The real process: exit status 2 and a one-line message on stderr, no traceback."""
    bad, val = _table(tmp_path, _unreadable_image)
    run_dir = tmp_path / "run"
    result = podium("train", *TABLE, f"data.train={bad}", f"data.val={val}",
                    f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={run_dir}")
    _assert_user_error(result, ["broken_image.png", "cannot read image"], run_dir)


def _isbi_original_tree(root: Path, missing: str) -> None:
    """RawImage/TrainingData/00N.bmp + AnnotationsByMD/400_senior/00N.txt (19 lines 'x,y'),
    without the annotation of image `missing`."""
    rng = np.random.default_rng(0)
    for i in range(1, 4):
        stem = f"{i:03d}"
        image = root / "RawImage" / "TrainingData" / f"{stem}.bmp"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 40), dtype=np.uint8), mode="L").save(image)
        if stem == missing:
            continue
        txt = root / "AnnotationsByMD" / "400_senior" / f"{stem}.txt"
        txt.parent.mkdir(parents=True, exist_ok=True)
        points = rng.uniform(2, 36, (19, 2)).round()
        txt.write_text("\n".join(f"{int(x)},{int(y)}" for x, y in points) + "\n1\n2\n")


def test_original_layout_missing_annotation_exits_2(tmp_path):
    root = tmp_path / "isbi"
    _isbi_original_tree(root, missing="002")
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "experiment=isbi2015_quick", "data.layout=original",
                                      f"data.root={root}", "data.val_count=1", "data.image_size=[32,32]",
                                      "trainer.max_epochs=1",
                                      *FAST, *SMALL_UNET, f"data.cache_dir={tmp_path / 'cache'}",
                                      f"run.dir={run_dir}"])
    assert isinstance(result.exception, SystemExit), result.exception
    _assert_user_error(result, ["002.txt", "does not exist"], run_dir)


def test_landmark_table_data_group_composes(tmp_path):
    result = CliRunner().invoke(app, ["train", "--cfg", "task=landmarks", "data=landmark_table",
                                      "model=heatmap_unet", "loss=spatial_softmax_nll",
                                      "data.train=train.csv", "data.val=val.csv"])
    assert result.exit_code == 0, result.output
    assert "name: landmark_table" in result.output


# ---- the real data ------------------------------------------------------------------------------


@pytest.mark.realdata
@pytest.mark.skipif(not ISBI_ROOT.is_dir(), reason=f"{ISBI_ROOT} is not available")
def test_isbi2015_quick_smoke(tmp_path):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "experiment=isbi2015_quick", f"data.root={ISBI_ROOT}",
                                      "data.max_images=4", "data.image_size=[64,52]", "model.encoder=resnet10t",
                                      "model.decoder_channels=[32,16,16,16,16]",
                                      "trainer.max_steps=2", "trainer.max_epochs=1", "trainer.batch_size=2",
                                      "trainer.num_workers=0", "tracking=none", "trainer.progress_bar=false",
                                      "task.overlays=1", f"data.cache_dir={tmp_path / 'cache'}",
                                      f"run.dir={run_dir}"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(metrics["test1/mre_mm"]) and metrics["test1/mre_mm"] > 0
    assert math.isfinite(metrics["val/mre_mm"])
    rows = read_csv(run_dir / "predictions" / "test1.csv")
    assert [r["id"] for r in rows] == ["151", "152", "153", "154"]
