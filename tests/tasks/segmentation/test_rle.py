"""Competition export (rle.py): the Kaggle run-length encoding, submission rows at the fixed
output size, the CSV writer and its validating decoder, and `podium predict` with
task.submission_size."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from podium.cli import app
from podium.errors import UserError
from podium.tasks.segmentation import rle
from podium.tasks.segmentation.preprocess import resize_mask

CLASSES = ["road", "car", "sky"]


def test_known_examples_checked_by_hand():
    # column-major numbering of a 3 x 3 mask:  1 4 7
    #                                          2 5 8
    #                                          3 6 9
    mask = np.array([[0, 0, 1],
                     [1, 0, 0],
                     [1, 0, 0]])
    assert rle.encode(mask) == "2 2 7 1"  # pixels 2, 3 (left column), 7 (top right)
    # a run continues from the bottom of one column to the top of the next: 2 x 3, numbers
    # 1 3 5 / 2 4 6; on: (1, 0) = 2, (0, 1) = 3, (1, 2) = 6
    mask = np.array([[0, 1, 0],
                     [1, 0, 1]], dtype=np.uint8)
    assert rle.encode(mask) == "2 2 6 1"
    assert rle.encode(np.zeros((3, 5))) == "-1"
    assert rle.encode(np.ones((3, 5), dtype=bool)) == "1 15"
    np.testing.assert_array_equal(rle.decode("2 2 7 1", (3, 3)), [[0, 0, 1], [1, 0, 0], [1, 0, 0]])


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 2), (1, 9), (540, 960)])
@pytest.mark.parametrize("density", [0.0, 0.03, 0.5, 0.97, 1.0])
def test_encode_decode_round_trip(shape, density):
    rng = np.random.default_rng(hash((shape, density)) % 2**32)
    mask = rng.random(shape) < density
    text = rle.encode(mask)
    assert (text == "-1") == (not mask.any())
    decoded = rle.decode(text, shape)
    assert decoded.dtype == bool and decoded.shape == shape
    np.testing.assert_array_equal(decoded, mask)


def test_decode_accepts_extra_whitespace_and_an_empty_string():
    np.testing.assert_array_equal(rle.decode("  2 2\t7 1 \n", (3, 3)), rle.decode("2 2 7 1", (3, 3)))
    assert not rle.decode("", (2, 2)).any()


@pytest.mark.parametrize("text,expected", [
    ("1 2 3", "even count"),
    ("0 2", ">= 1"),
    ("3 0", ">= 1"),
    ("5 2 6 1", "not overlap"),       # run 2 starts inside run 1
    ("5 2 1 1", "not overlap"),       # runs out of order
    ("14 3", "past the 15 pixels"),   # pixels 14 .. 16 of a 3 x 5 mask
    ("1.5 2", "'1.5'"),
    ("a b", "'a'"),
    ("-3 2", "'-3'"),
])
def test_decode_names_what_is_wrong(text, expected):
    with pytest.raises(ValueError, match="must be|expected|past|token") as info:
        rle.decode(text, (3, 5))
    assert expected in str(info.value)


def _class_map(shape=(27, 48), seed=0):
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.uint8)  # blobs, not salt-and-pepper, like a real prediction
    label[: shape[0] // 3] = 2
    for _ in range(5):
        r, c = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        label[r:r + 6, c:c + 9] = 1
    return label


def test_submission_round_trip_through_the_csv(tmp_path):
    maps = {"frame_a": _class_map(seed=0), "frame_b": _class_map(seed=1)}
    maps["frame_b"][:] = 0  # classes absent from an image -> "-1" rows
    rows = [row for id_, m in maps.items() for row in rle.submission_rows(id_, m, CLASSES, size=(96, 54))]
    assert [(r["id"], r["class"]) for r in rows[:3]] == [("frame_a", c) for c in CLASSES]
    assert [r["rle"] for r in rows[4:]] == ["-1", "-1"]
    path = rle.write_submission(rows, tmp_path / "sub.csv")
    assert path.read_text().splitlines()[0] == "id,class,rle"
    decoded = rle.read_submission(path, (96, 54), CLASSES)
    assert decoded.keys() == maps.keys()
    for id_, m in maps.items():
        assert decoded[id_].shape == (54, 96)
        np.testing.assert_array_equal(decoded[id_], resize_mask(m, (54, 96)))


def test_the_challenge_size_is_960_by_540(tmp_path):
    rows = rle.submission_rows("x", _class_map((135, 240)), CLASSES)
    decoded = rle.read_submission(rle.write_submission(rows, tmp_path / "s.csv"), rle.DEFAULT_SIZE, CLASSES)
    assert rle.DEFAULT_SIZE == (960, 540) and decoded["x"].shape == (540, 960)
    # 135 x 240 -> 540 x 960 is 4x: every source pixel becomes a 4 x 4 block
    np.testing.assert_array_equal(decoded["x"], np.kron(_class_map((135, 240)), np.ones((4, 4), np.uint8)))


def test_noisy_full_size_masks_exceed_the_csv_field_limit_and_still_read(tmp_path):
    label = (np.indices((540, 960)).sum(0) % 2).astype(np.uint8)  # a checkerboard: 259200 runs per class
    rows = rle.submission_rows("noisy", label, ["even", "odd"])
    assert len(rows[0]["rle"]) > csv.field_size_limit()
    path = rle.write_submission(rows, tmp_path / "s.csv")
    np.testing.assert_array_equal(rle.read_submission(path, (960, 540), ["even", "odd"])["noisy"], label)


def test_ignored_pixels_are_claimed_by_no_class(tmp_path):
    label = _class_map()
    label[:4, :4] = 255
    rows = rle.submission_rows("a", label, CLASSES, size=(48, 27), ignore=255)
    decoded = rle.read_submission(rle.write_submission(rows, tmp_path / "s.csv"), (48, 27), CLASSES)["a"]
    np.testing.assert_array_equal(decoded, label)  # 255 = unclaimed
    with pytest.raises(ValueError, match="label 255 is outside the 3 classes"):
        rle.submission_rows("a", label, CLASSES, size=(48, 27))


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("lines,expected", [
    (["id,class,rle", "a,road,1 2 3", "a,car,-1", "a,sky,-1"], "line 2 (id 'a', class 'road'): bad RLE: 3 numbers"),
    (["id,class,rle", "a,road,1 5", "a,car,4 2", "a,sky,-1"], "line 3 (id 'a', class 'car'): pixel 4 (row 3, column 0) "
                                                             "is also claimed by class 'road'"),
    (["id,class,rle", "a,road,1 2", "a,car,1x 2", "a,sky,-1"], "line 3 (id 'a', class 'car'): bad RLE: token '1x'"),
    (["id,class,rle", "a,road,5 2 6 1", "a,car,-1", "a,sky,-1"], "line 2 (id 'a', class 'road'): bad RLE: run 2"),
    (["id,class,rle", "a,road,50 1", "a,car,-1", "a,sky,-1"], "line 2 (id 'a', class 'road'): bad RLE: the last run"),
    (["id,class,rle", "a,bus,-1"], "line 2: unknown class 'bus'"),
    (["id,class,rle", "a,road,-1", "a,road,-1"], "line 3: a second row for id 'a', class 'road'"),
    (["id,class,rle", "a,road,-1", "a,car,-1"], "id 'a' has no row for class(es) ['sky']"),
    (["image,label,rle", "a,road,-1"], "expected id,class,rle"),
    (["id,class,rle", "a,road"], "line 2: expected 3 fields"),
])
def test_corrupt_submissions_name_the_file_the_line_and_the_problem(tmp_path, lines, expected):
    path = _write(tmp_path / "bad.csv", lines)
    with pytest.raises(UserError) as info:
        rle.read_submission(path, (8, 6), CLASSES)  # 48 pixels
    assert str(path) in str(info.value) and expected in str(info.value), str(info.value)


def test_duplicate_rows_are_refused_when_writing(tmp_path):
    rows = rle.submission_rows("same", _class_map(), CLASSES, size=(48, 27)) * 2
    with pytest.raises(UserError, match="two rows for id 'same', class 'road'"):
        rle.write_submission(rows, tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize("size", [[96], [96, 0], [-4, 5], [9.5, 4], [1, 2, 3], "96x54", [True, 4]])
def test_bad_sizes_name_the_key(size):
    with pytest.raises(UserError, match=r"task.submission_size=.*two positive integers"):
        rle.check_size(size)


def test_predict_writes_a_submission_that_decodes_to_the_predicted_masks(segformer_run, tmp_path):
    images = sorted((segformer_run.parent / "gen").glob("*/images/*.tif"))[:2]
    out = tmp_path / "x.csv"
    result = CliRunner().invoke(app, ["predict", str(segformer_run), *map(str, images), "--out", str(out),
                                      "-o", "task.submission_size=[96,54]"])
    assert result.exit_code == 0, result.output
    submission = tmp_path / "x_submission.csv"
    rows = list(csv.DictReader(submission.open()))
    assert len(rows) == 2 * 2 and {r["class"] for r in rows} == {"background", "vessel"}
    decoded = rle.read_submission(submission, (96, 54), ["background", "vessel"])
    assert sorted(decoded) == sorted(p.stem for p in images)
    for image in images:
        # the mask PNG is at the image's own size (data.scale=1: the network's size), 0/255
        png = np.asarray(Image.open(tmp_path / "x_masks" / f"{image.stem}.png")) // 255
        np.testing.assert_array_equal(decoded[image.stem], resize_mask(png.astype(np.uint8), (54, 96)))

    # off by default; a bad size is exit 2 naming the key, and writes no submission
    bad = CliRunner().invoke(app, ["predict", str(segformer_run), str(images[0]), "--out", str(tmp_path / "y.csv"),
                                   "-o", "task.submission_size=[96,0]"])
    assert bad.exit_code == 2 and "task.submission_size" in bad.output, bad.output
    assert not (tmp_path / "y_submission.csv").exists()
    plain = CliRunner().invoke(app, ["predict", str(segformer_run), str(images[0]), "--out", str(tmp_path / "z.csv")])
    assert plain.exit_code == 0, plain.output
    assert (tmp_path / "z.csv").is_file() and not (tmp_path / "z_submission.csv").exists()
