"""A tiny simulated-MRI run's saved volumes (predictions/<split>/: the reconstructions and, in
truth/, the targets, SSIM data ranges and foreground masks) scored with
`ReconstructionTask.score_predictions` reproduce its metrics.json, and `podium ensemble` of
reconstruction runs averages the volumes and scores members and ensemble."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from podium.cli import app
from podium.engine.predictions import read_predictions, write_predictions
from podium.engine.runcard import task_for_run
from podium.errors import UserError
from tests.tasks.reconstruction.test_e2e_reconstruction import TINY

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One epoch on 48 x 40 simulated k-space, SNU metrics on (every key `aggregate` can give)."""
    tmp = tmp_path_factory.mktemp("recon_scored")
    result = runner.invoke(app, ["train", *TINY, "task.snu_metrics=true", f"run.dir={tmp / 'run'}",
                                 f"data.cache_dir={tmp / 'cache'}"])
    assert result.exit_code == 0, result.output
    return tmp / "run"


def test_saved_volumes_reproduce_the_run_metrics(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    saved = read_predictions(run_dir / "predictions" / "val")
    assert saved.kind == "volume" and saved.ids == ["val_000_acc4", "val_000_acc8"]
    assert saved.manifest["anatomy"] == {"val_000_acc4": "brain", "val_000_acc8": "brain"}
    assert {saved.role(n) for n in ("target", "max_value", "fg_mask")} == {"truth"}
    for id_ in saved.ids:
        recon, target = saved.sample("reconstruction", id_), saved.sample("target", id_)
        assert recon.shape == target.shape == (2, 48, 40) and target.dtype == np.float32
        assert saved.sample("max_value", id_).shape == (2,) and saved.sample("fg_mask", id_).any()
    # the truth sits apart from the submission volumes
    assert sorted(p.name for p in (run_dir / "predictions" / "val").glob("*.h5")) == [f"{i}.h5" for i in saved.ids]
    scored = task_for_run(run_dir).score_predictions(saved, "val")
    expected = {k.removeprefix("val/"): v for k, v in metrics.items() if k.startswith("val/")}
    assert set(scored) == set(expected) and "ssim_snu_leaderboard" in scored and "psnr_acc8_brain" in scored
    for name, value in scored.items():
        assert value == pytest.approx(expected[name], rel=1e-6, abs=1e-6), name


def test_a_worse_reconstruction_scores_lower(run_dir, tmp_path):
    """The scorer reads the saved volumes, not the run's numbers: noise added to them costs SSIM."""
    folder = tmp_path / "noisy"
    saved = read_predictions(run_dir / "predictions" / "val")
    rng = np.random.default_rng(0)
    noisy = [v + 0.2 * v.max() * rng.standard_normal(v.shape).astype(np.float32)
             for v in (saved.sample("reconstruction", i) for i in saved.ids)]
    truth = {n: [saved.sample(n, i) for i in saved.ids] for n in ("target", "max_value", "fg_mask")}
    meta = {k: saved.manifest[k] for k in ("split", "task", "acceleration", "anatomy", "slices")}
    write_predictions(folder, "volume", saved.ids, {"reconstruction": noisy}, truth=truth, **meta)
    task = task_for_run(run_dir)
    clean, worse = task.score_predictions(saved, "val"), task.score_predictions(read_predictions(folder), "val")
    assert worse["ssim"] < clean["ssim"] - 0.01 and worse["psnr"] < clean["psnr"]


def test_a_set_without_truth_is_a_user_error(run_dir, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(run_dir / "predictions" / "val", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for name in ("target", "max_value", "fg_mask"):  # what sets saved before the truth look like
        del manifest["arrays"][name]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"old: the saved set lacks target, max_value"):
        task_for_run(run_dir).score_predictions(read_predictions(copy), "val")


def test_ensemble_of_a_run_with_itself_scores_exactly_the_member(run_dir, tmp_path):
    out = tmp_path / "ens"
    result = runner.invoke(app, ["ensemble", str(run_dir), str(run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "ssim" in result.output
    entry = json.loads((out / "ensemble.json").read_text())["splits"]["val"]
    assert entry["kind"] == "volume" and entry["members"][str(run_dir)] == entry["ensemble"]
    assert entry["gain"] == 0.0
    ens, member = read_predictions(out / "predictions" / "val"), read_predictions(run_dir / "predictions" / "val")
    for id_ in member.ids:  # written as per-sample arrays, truth carried along
        np.testing.assert_array_equal(ens.sample("reconstruction", id_), member.sample("reconstruction", id_))
        np.testing.assert_array_equal(ens.sample("target", id_), member.sample("target", id_))


@pytest.fixture
def second_run(run_dir, tmp_path) -> Path:
    """A copy of the run whose saved reconstructions are 0.8 times the first run's."""
    other = tmp_path / "other"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("checkpoints"))
    for path in (other / "predictions" / "val").glob("*.h5"):
        with h5py.File(path, "r+") as f:
            f["reconstruction"][...] = f["reconstruction"][()] * np.float32(0.8)
    return other


def test_ensemble_of_two_runs_is_the_weighted_mean_and_is_scored(run_dir, second_run, tmp_path):
    out = tmp_path / "ens2"
    result = runner.invoke(app, ["ensemble", str(run_dir), str(second_run), "--out", str(out), "--weights", "1,3"])
    assert result.exit_code == 0, result.output
    a, b = (read_predictions(r / "predictions" / "val") for r in (run_dir, second_run))
    ens = read_predictions(out / "predictions" / "val")
    for id_ in a.ids:
        expected = 0.25 * a.sample("reconstruction", id_) + 0.75 * b.sample("reconstruction", id_)
        np.testing.assert_allclose(ens.sample("reconstruction", id_), expected, rtol=1e-6)
    entry = json.loads((out / "ensemble.json").read_text())["splits"]["val"]
    task = task_for_run(run_dir)
    assert entry["members"][str(second_run)] == pytest.approx(task.score_predictions(b, "val"))
    assert entry["members"][str(second_run)]["nmse"] != pytest.approx(entry["members"][str(run_dir)]["nmse"])
    assert entry["ensemble"] == pytest.approx(task.score_predictions(ens, "val"))
    assert entry["main_metric"] == "ssim" and entry["mode"] == "max"


def test_members_with_different_targets_exit_2_naming_the_array(run_dir, second_run, tmp_path):
    for path in (second_run / "predictions" / "val" / "truth").glob("*.h5"):
        with h5py.File(path, "r+") as f:
            f["target"][0, 0, 0] += 1.0
    result = runner.invoke(app, ["ensemble", str(run_dir), str(second_run), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    assert "'target'" in result.output and "differ" in result.output


def test_combined_volumes_are_reduced_on_access_and_never_written_over_a_member(run_dir, tmp_path):
    """`combine` keeps referenced volumes lazy (a set of MRI volumes can exceed memory): the mean
    is computed per volume when written or scored, so writing it over a member is refused."""
    from podium.engine.predictions import combine

    member = tmp_path / "val"
    shutil.copytree(run_dir / "predictions" / "val", member)
    a, b = read_predictions(member), read_predictions(run_dir / "predictions" / "val")
    mean = combine([a, b], weights=[1, 3])
    assert not isinstance(mean.arrays["reconstruction"], list) and not isinstance(mean.arrays["target"], list)
    np.testing.assert_array_equal(mean.sample("reconstruction", a.ids[1]), a.sample("reconstruction", a.ids[1]))
    with pytest.raises(UserError, match="new folder"):
        mean.write(member)
    np.testing.assert_array_equal(read_predictions(member).sample("target", a.ids[0]), a.sample("target", a.ids[0]))
