"""`podium augment`: the materialised set is reproducible whatever the number of workers, is an
image-folder dataset training reads, and carries a manifest; bad requests exit 2."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from podium.cli import app
from podium.config import compose
from podium.engine import registry
from podium.errors import UserError
from podium.toolkit.augment import materialise

DIGITS = ["experiment=digits", "data.image_size=12", "+data.augment=[{name: Corrupt, p: 0.8}]"]


def pngs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("aug") / "set"
    materialise(compose(DIGITS), 30, out, workers=0)
    return out


def test_the_same_set_with_any_number_of_workers(made, tmp_path):
    materialise(compose(DIGITS), 30, tmp_path / "two", workers=2)
    assert pngs(made) == pngs(tmp_path / "two")


def test_the_manifest_says_what_made_each_file(made):
    manifest = json.loads((made / "manifest.json").read_text())
    assert manifest["n"] == 30 and manifest["augment"][0]["name"] == "Corrupt"
    assert manifest["podium_version"] and len(manifest["data_config_hash"]) == 16
    rows = list(csv.DictReader((made / "manifest.csv").open()))
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 30 and all((made / r["file"]).is_file() for r in rows)
    assert train[0]["source"].startswith("digits-") and train[0]["seed"] != ""


def test_the_set_is_an_image_folder_dataset(made):
    cfg = compose(["experiment=digits", "data=image_folder", f"data.root={made}", "data.image_size=12"])
    datasets = registry.build("task", cfg.task.name, cfg).build_datasets()
    assert len(datasets["train"]) == 30 and {"val", "test", "test_corrupted"} <= set(datasets)
    assert datasets["train"].classes == [str(d) for d in range(10)]


def test_preview_writes_only_a_grid(tmp_path):
    result = CliRunner().invoke(app, ["augment", *DIGITS, "--n", "8", "--preview", "--out", str(tmp_path / "g.png")])
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "--n must be at least 1"),
    (["--n", "4", "--preview"], "the grid's .png file"),
])
def test_bad_requests_exit_2(tmp_path, args, message):
    result = CliRunner().invoke(app, ["augment", *DIGITS, *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and message in " ".join(result.output.split())


def test_an_existing_folder_is_never_written_into(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="not an empty folder"):
        materialise(compose(DIGITS), 4, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_a_task_without_class_samples_is_refused(tmp_path):
    with pytest.raises(UserError, match="image-classification sets"):
        materialise(compose(["experiment=landmarks_synthetic"]), 4, tmp_path / "o")
