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

`write_truth` keeps the scorer's inputs with each saved volume (`predictions/<split>/truth/
<volume>_acc<N>.h5`: target, SSIM data range per slice, foreground mask), and
`slice_records` scores a saved set (this run's, an ensemble's) from those arrays alone, slice
by slice as `ReconstructionTask.evaluation_step` does, so `aggregate` reduces them unchanged.
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


TRUTH_DIR = "truth"  # beside the submission volumes, not among them (a zip of *.h5 stays a submission)
TRUTH_KEYS = ("target", "max_value", "fg_mask")


def write_truth(records: list[dict], written: dict, out_dir: Path, sample_of) -> dict[tuple[int, int], Path]:
    """For each saved (volume, acceleration), `out_dir/truth/<name>.h5` with `target` (slices,
    h, w) float32 in the data's units, `max_value` (slices,) the SSIM data range each slice was
    scored with, `fg_mask` (slices, h, w) uint8 (the SNU foreground); rows in the order of the
    saved reconstruction. `sample_of(index)` is the dataset sample of a record: the target is
    read back from the data one slice at a time (records hold no images)."""
    import h5py

    folder = out_dir / TRUTH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    by_volume = defaultdict(list)
    for r in records:
        by_volume[(r["volume"], r["acceleration"])].append(r)
    out = {}
    for key, (path, positions) in sorted(written.items()):
        recs = sorted(by_volume[key], key=lambda r: positions[r["slice"]])
        truth_path = folder / path.name
        with h5py.File(truth_path, "w") as f:
            target = fg = None
            for position, r in enumerate(recs):
                sample = sample_of(r["index"])
                # float64 product, then float32 like the saved reconstruction (data units both)
                image = (sample["target"].numpy().astype(np.float64) * float(sample["scale"])).astype(np.float32)
                if target is None:
                    target = f.create_dataset("target", shape=(len(recs), *image.shape), dtype=np.float32)
                    fg = f.create_dataset("fg_mask", shape=(len(recs), *image.shape), dtype=np.uint8)
                target[position] = image
                fg[position] = (sample["fg_mask"].numpy() > 0.5).astype(np.uint8)
            f.create_dataset("max_value", data=np.array([float(r["max_value"]) for r in recs], dtype=np.float64))
            f.attrs["acceleration"] = key[1]
        out[key] = truth_path
    return out


def slice_records(predictions, snu: bool, anatomy_id) -> list[dict]:
    """The records `ReconstructionTask.aggregate` reduces, recomputed from a saved volume set:
    per slice SSIM (data range `max_value`), squared error, energy, target maximum, pixels and,
    with `snu`, the foreground-masked SSIM. One volume in memory at a time. `anatomy_id` maps
    the manifest's anatomy name to the records' integer."""
    from podium.errors import UserError
    from podium.tasks.reconstruction import metrics as rm

    where = predictions.folder if predictions.folder is not None else "the combined predictions"
    if predictions.kind != "volume":
        raise UserError(f"{where}: expected reconstruction volumes (kind volume), got {predictions.kind}.")
    needed = ["reconstruction", "target", "max_value"] + (["fg_mask"] if snu else [])
    missing = [k for k in needed if k not in predictions.arrays]
    if missing:
        raise UserError(f"{where}: the saved set lacks {', '.join(missing)} (sets saved before reconstruction "
                        f"predictions carried their targets cannot be scored; rerun `podium eval RUN_DIR`).")
    accelerations = predictions.manifest.get("acceleration") or {}
    anatomies = predictions.manifest.get("anatomy") or {}
    records = []
    for row, id_ in enumerate(predictions.ids):
        if id_ not in accelerations:
            raise UserError(f"{where}/manifest.json: no acceleration for {id_!r}.")
        pred = np.asarray(predictions.arrays["reconstruction"][row], dtype=np.float64)
        target = np.asarray(predictions.arrays["target"][row], dtype=np.float64)
        maxval = np.asarray(predictions.arrays["max_value"][row], dtype=np.float64).reshape(-1)
        fg = np.asarray(predictions.arrays["fg_mask"][row], dtype=np.float64) if snu else None
        if pred.shape != target.shape or len(maxval) != len(target) or (fg is not None and fg.shape != target.shape):
            raise UserError(f"{where}: {id_!r} has reconstruction {pred.shape}, target {target.shape}, "
                            f"{len(maxval)} data ranges{'' if fg is None else f', fg_mask {fg.shape}'}; "
                            "expected one shape and one data range per slice.")
        base = {"volume": row, "acceleration": int(accelerations[id_]),
                "anatomy": anatomy_id(anatomies.get(id_)), "pixels": int(target[0].size) if len(target) else 0}
        for s, (t, p) in enumerate(zip(target, pred)):
            rec = {**base, "slice": s, "ssim": rm.ssim_fastmri(t[None], p[None], maxval=float(maxval[s])),
                   "sse": float(((t - p) ** 2).sum()), "energy": float((t**2).sum()), "target_max": float(t.max())}
            if snu:
                rec["ssim_snu"] = rm.ssim_fastmri((t * fg[s])[None], (p * fg[s])[None], maxval=float(maxval[s]))
            records.append(rec)
    return records
