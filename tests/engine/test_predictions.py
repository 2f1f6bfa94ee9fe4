"""The prediction contract: write / read round trips per kind, alignment by sample id, refusals,
weighted combination, and UserErrors that name the broken file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from podium.engine.predictions import KINDS, combine, read_predictions, write_predictions
from podium.errors import UserError

IDS = ["b_07", "a/01", "c 3"]  # not sorted, with a slash and a space: ids are never file names


def class_set(folder, probs, ids=IDS, labels=(0, 1, 1), classes=("cat", "dog")):
    write_predictions(folder, "class_probs", ids, {"probs": np.asarray(probs, np.float32)},
                      truth={"labels": np.asarray(labels, np.int64)}, split="test", task="classification",
                      classes=list(classes))
    return read_predictions(folder)


def test_round_trip_every_kind_stacked_and_per_sample(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [(5, 7), (6, 4), (3, 3)]  # images of different sizes: one file per sample
    cases = {
        "class_probs": {"probs": rng.random((3, 4)).astype(np.float32)},
        "mask_probs": {"probs": [rng.random((2, h, w)).astype(np.float16) for h, w in sizes]},
        "points": {"points": rng.random((3, 5, 2))},
        "image": {"image": [rng.random(s).astype(np.float32) for s in sizes]},
        "volume": {"volume": [rng.random((2, *s)).astype(np.float32) for s in sizes]},
    }
    assert set(cases) == set(KINDS)
    for kind, arrays in cases.items():
        folder = tmp_path / kind
        write_predictions(folder, kind, IDS, arrays, truth={"spacing": np.ones((3, 2))}, split="val", meaning="m")
        back = read_predictions(folder)
        assert back.kind == kind and back.ids == IDS and back.manifest["split"] == "val"
        assert back.role(next(iter(arrays))) == "prediction" and back.role("spacing") == "truth"
        for name, value in arrays.items():
            for row, id_ in enumerate(IDS):
                got = back.sample(name, id_)
                assert got.dtype == np.asarray(value[row]).dtype
                np.testing.assert_array_equal(got, value[row])
    assert isinstance(read_predictions(tmp_path / "class_probs").arrays["probs"], np.memmap)


def test_referenced_files_are_read_in_place(tmp_path):
    h5py = pytest.importorskip("h5py")
    files = []
    for i, id_ in enumerate(IDS):
        files.append(tmp_path / "split" / f"vol{i}.h5")
        files[-1].parent.mkdir(exist_ok=True)
        with h5py.File(files[-1], "w") as f:
            f["reconstruction"] = np.full((2, 3, 3), i, np.float32)
    write_predictions(tmp_path / "split", "volume", IDS, {},
                      references={"reconstruction": {"files": files, "key": "reconstruction"}})
    back = read_predictions(tmp_path / "split")
    assert back.sample("reconstruction", "c 3")[0, 0, 0] == 2
    assert back.manifest["arrays"]["reconstruction"]["files"][0] == "vol0.h5"  # relative: the run may move


def test_combine_aligns_by_id_and_weights(tmp_path):
    a = class_set(tmp_path / "a", [[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    # the same samples in another order: combine must match rows by id, not by position
    b = class_set(tmp_path / "b", [[0.6, 0.4], [0.1, 0.9], [0.3, 0.7]], ids=["c 3", "b_07", "a/01"],
                  labels=(1, 0, 1))
    mean = combine([a, b], weights=[3, 1])
    assert mean.ids == IDS and mean.kind == "class_probs"
    np.testing.assert_allclose(mean.sample("probs", "b_07"), [0.75 * 0.9 + 0.25 * 0.1, 0.75 * 0.1 + 0.25 * 0.9], rtol=1e-6)
    np.testing.assert_allclose(mean.sample("probs", "c 3"), [0.75 * 0.5 + 0.25 * 0.6, 0.75 * 0.5 + 0.25 * 0.4], rtol=1e-6)
    np.testing.assert_array_equal(mean.arrays["labels"], [0, 1, 1])
    assert mean.manifest["weights"] == [0.75, 0.25]
    geo = combine([a, b], how="geometric")
    np.testing.assert_allclose(np.asarray(geo.arrays["probs"]).sum(1), 1.0, rtol=1e-6)
    p = np.sqrt([0.9 * 0.1, 0.1 * 0.9])
    np.testing.assert_allclose(geo.sample("probs", "b_07"), p / p.sum(), rtol=1e-6)
    mean.write(tmp_path / "ens")  # a combined set is itself a prediction set
    again = read_predictions(tmp_path / "ens")
    np.testing.assert_allclose(again.sample("probs", "c 3"), mean.sample("probs", "c 3"))
    assert again.manifest["combined_from"] == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_combine_per_sample_masks_and_points(tmp_path):
    masks = [[np.full((2, 2), v, np.float16)] for v in (0.2, 0.6)]
    sets = []
    for i, m in enumerate(masks):
        write_predictions(tmp_path / str(i), "mask_probs", ["x"], {"probs": m})
        sets.append(read_predictions(tmp_path / str(i)))
    np.testing.assert_allclose(combine(sets).sample("probs", "x"), 0.4, atol=1e-3)
    geo = combine(sets, how="geometric").sample("probs", "x")  # binary: background is 1 - p
    expected = np.sqrt(0.2 * 0.6) / (np.sqrt(0.2 * 0.6) + np.sqrt(0.8 * 0.4))
    np.testing.assert_allclose(geo, expected, atol=1e-3)
    pts = []
    for i, v in enumerate((1.0, 3.0)):
        write_predictions(tmp_path / f"p{i}", "points", ["x"], {"points": np.full((1, 2, 2), v)}, landmarks=["s", "n"])
        pts.append(read_predictions(tmp_path / f"p{i}"))
    np.testing.assert_allclose(combine(pts, weights=[1, 3]).sample("points", "x"), 2.5)
    with pytest.raises(UserError, match="geometric"):
        combine(pts, how="geometric")


def test_combine_refusals_name_the_folders(tmp_path):
    a = class_set(tmp_path / "a", np.full((3, 2), 0.5))
    other_ids = class_set(tmp_path / "b", np.full((3, 2), 0.5), ids=["b_07", "a/01", "zz"])
    with pytest.raises(UserError, match=r"(?s)different samples.*'c 3'.*'zz'") as e:
        combine([a, other_ids])
    assert str(tmp_path / "a") in str(e.value) and str(tmp_path / "b") in str(e.value)
    with pytest.raises(UserError, match="different classes"):
        combine([a, class_set(tmp_path / "c", np.full((3, 2), 0.5), classes=("dog", "cat"))])
    write_predictions(tmp_path / "d", "points", IDS, {"probs": np.zeros((3, 2))})
    with pytest.raises(UserError, match="different kind"):
        combine([a, read_predictions(tmp_path / "d")])
    with pytest.raises(UserError, match="ground truth"):
        combine([a, class_set(tmp_path / "e", np.full((3, 2), 0.5), labels=(1, 1, 1))])
    for bad in ([1], [1, -1], [0, 0]):
        with pytest.raises(UserError, match="weights"):
            combine([a, a], weights=bad)


def test_missing_or_corrupt_files_are_user_errors_naming_the_file(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "none" / "manifest.json")):
        read_predictions(tmp_path / "none")
    class_set(tmp_path / "s", np.full((3, 2), 0.5))
    manifest = tmp_path / "s" / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(UserError, match="corrupt prediction manifest") as e:
        read_predictions(tmp_path / "s")
    assert str(manifest) in str(e.value)
    manifest.write_text(json.dumps({**json.loads(text), "format": 99}))
    with pytest.raises(UserError, match="format 99"):
        read_predictions(tmp_path / "s")
    manifest.write_text(text)
    (tmp_path / "s" / "probs.npy").write_bytes(b"not numpy")
    with pytest.raises(UserError, match="probs.npy"):
        read_predictions(tmp_path / "s")
    write_predictions(tmp_path / "m", "image", ["x"], {"image": [np.zeros((2, 2))]})
    (tmp_path / "m" / "image" / "000000.npy").unlink()
    with pytest.raises(UserError, match="000000.npy"):
        read_predictions(tmp_path / "m").sample("image", "x")


def test_rewriting_a_split_removes_the_previous_arrays(tmp_path):
    write_predictions(tmp_path, "image", ["x", "y"], {"image": [np.zeros(2), np.ones(2)]})
    write_predictions(tmp_path, "class_probs", ["x"], {"probs": np.ones((1, 2))})
    assert not list((tmp_path / "image").glob("*.npy"))
    assert read_predictions(tmp_path).ids == ["x"]
