"""A tiny segmentation run shared by the files of this folder (trained once per pytest process).

    .venv/bin/python -m pytest -q tests/tasks/segmentation/test_rle.py tests/tasks/segmentation/test_segformer.py

`segformer_run`: one optimizer step of SegFormer (mit_b0, decoder width 16) on four generated
64 x 64 fundus images, whole-image 64 x 64 windows (about 10 s on one CPU thread). Read only:
consumers predict into tmp_path; the teardown of tests/conftest.py's `_shared` fails a test that
wrote into it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import _shared, _train

SEGFORMER_TINY = ["experiment=seg_synthetic", "model=segformer", "model.decoder_channels=16", "data.count=6",
                  "data.size=[64,64]", "data.val_count=1", "data.test_count=1", "data.patch_size=[32,32]",
                  "data.patches_per_image=2", "task.window=[64,64]", "task.overlays=1", "trainer.max_steps=1",
                  "trainer.batch_size=4", "trainer.num_workers=0", "tracking=none", "trainer.progress_bar=false"]


@pytest.fixture(scope="session")
def segformer_run(tmp_path_factory) -> Path:
    """A finished SEGFORMER_TINY run (read only); its generated images are under ../gen."""
    tmp = tmp_path_factory.mktemp("shared-segformer")
    _train([*SEGFORMER_TINY, f"data.root={tmp / 'gen'}", f"run.dir={tmp / 'run'}"])
    yield from _shared(tmp / "run")
