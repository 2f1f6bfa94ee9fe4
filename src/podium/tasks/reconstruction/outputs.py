"""Evaluation images on disk instead of in memory: a split of hundreds of 384 x 384 slices held
as records (and gathered across ranks) would not fit, so every reconstructed slice goes to a
spool file as soon as it is made, and `write_volumes` assembles the spooled slices volume by
volume into the submission files `predictions/<split>/<volume>_acc<N>.h5` (key
`reconstruction`, (slices, h, w), the data's own units), one volume in memory at a time.

The task cannot tell a per-epoch validation from the final evaluation (only the latter saves
predictions), so each evaluation pass spools into its own folder; a pass's folder is deleted
once its volumes are written, or two passes later (another rank may still be reading the
previous pass). The spool lives in the run folder (shared by the ranks of a multi-node job)
when the config names an existing one, else in a temporary folder removed at exit.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import weakref
from collections import defaultdict
from pathlib import Path

import numpy as np

_PASS_DIR = re.compile(r"pass(\d+)-rank(\d+)$")


class SliceSpool:
    """One .npy per evaluated slice, in a folder per evaluation pass."""

    def __init__(self, run_dir: str | None):
        self._run_dir = Path(run_dir) if run_dir else None
        self._root: Path | None = None
        self.passes = 0
        self._open = False

    @property
    def root(self) -> Path:
        if self._root is None:
            if self._run_dir is not None and self._run_dir.is_dir():
                self._root = self._run_dir / ".eval_spool"
            else:
                self._root = Path(tempfile.mkdtemp(prefix="podium-eval-spool-"))
                weakref.finalize(self, shutil.rmtree, str(self._root), True)
        return self._root

    def _pass_dir(self, number: int, rank: int) -> Path:
        return self.root / f"pass{number:06d}-rank{rank}"

    def write(self, image: np.ndarray, rank: int, volume: int, acceleration: int, slice_index: int) -> str:
        if not self._open:  # first slice of a new evaluation pass
            self.passes += 1
            self._open = True
            old = self._pass_dir(self.passes - 2, rank)
            if old.is_dir():  # two passes back: every rank is done reading it
                shutil.rmtree(old, ignore_errors=True)
        folder = self._pass_dir(self.passes, rank)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"v{volume}_acc{acceleration}_s{slice_index}.npy"
        np.save(path, np.asarray(image, dtype=np.float32))
        return str(path)

    def end_pass(self) -> None:
        self._open = False

    def release(self, files: list[str]) -> None:
        """Delete consumed slice files and every pass folder up to the newest one they came from
        (empty ones, and older unconsumed ones: per-epoch validations nobody saves)."""
        newest: dict[Path, int] = {}
        for f in files:
            f = Path(f)
            f.unlink(missing_ok=True)
            match = _PASS_DIR.search(f.parent.name)
            if match:
                newest[f.parent.parent] = max(newest.get(f.parent.parent, -1), int(match.group(1)))
        for root, number in newest.items():
            if not root.is_dir():
                continue
            for folder in root.iterdir():
                match = _PASS_DIR.search(folder.name)
                if match and int(match.group(1)) <= number:
                    shutil.rmtree(folder, ignore_errors=True)
            if not any(root.iterdir()):
                root.rmdir()


def write_volumes(records: list[dict], out_dir: Path, volume_name) -> dict[tuple[int, int], tuple[Path, dict]]:
    """Assemble the spooled slices of each (volume, acceleration) into `out_dir/<name>_acc<N>.h5`.
    Returns {(volume, acc): (path, {slice: position in the file})}."""
    import h5py

    out_dir.mkdir(parents=True, exist_ok=True)
    by_volume = defaultdict(list)
    for r in records:
        by_volume[(r["volume"], r["acceleration"])].append(r)
    written = {}
    for (vol, acc), recs in sorted(by_volume.items()):
        recs = sorted(recs, key=lambda r: r["slice"])
        path = out_dir / f"{volume_name(vol)}_acc{acc}.h5"
        with h5py.File(path, "w") as f:
            data = f.create_dataset("reconstruction", shape=(len(recs), *np.load(recs[0]["image_file"]).shape),
                                    dtype=np.float32)
            for position, r in enumerate(recs):  # one slice in memory at a time
                data[position] = np.load(r["image_file"])
            f.attrs["acceleration"] = acc
        written[(vol, acc)] = (path, {r["slice"]: i for i, r in enumerate(recs)})
    return written
