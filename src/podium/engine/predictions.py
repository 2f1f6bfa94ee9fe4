"""The prediction contract: what a run saves per split, so that CV, TTA, ensembles, diff and
audit can read, combine and re-score predictions without knowing the task that made them.

Layout of one split (`RUN/predictions/<split>/`):

    manifest.json   {"format": 1, "kind", "split", "task", "count", "index": "index.csv",
                     "arrays": {name: {"file" | "dir" | "files", "shape", "dtype", "role", ...}},
                     "classes" / "landmarks" where they apply, "meaning", any other metadata}
    index.csv       row,id — the sample id (file stem or dataset id, never an ordinal position)
                    of each row; every array's first axis (or file list) follows these rows
    <name>.npy      a stacked array (N, ...): memory-mapped on read
    <name>/<row>.npy  one file per sample when samples differ in size (masks at each image's own
                    size); files are named by row because ids may hold '/' or odd characters
    files           (reconstruction) existing files referenced in place, e.g. HDF5 volumes,
                    with the dataset `key` inside each; never copied

Kinds: class_probs, mask_probs, points, image, volume. Each array has a role: "prediction"
(what `combine` averages) or "truth" (labels, targets, spacing: carried so a task can score a
saved set unchanged with `Task.score_predictions`; `combine` requires them equal).

    from podium.engine.predictions import read_predictions, combine
    mean = combine([read_predictions("runs/a/predictions/test"), read_predictions("runs/b/predictions/test")],
                   weights=[2, 1])
    mean.write("runs/ensemble/predictions/test")
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from podium.errors import UserError

FORMAT = 1
KINDS = ("class_probs", "mask_probs", "points", "image", "volume")
MANIFEST, INDEX = "manifest.json", "index.csv"


@dataclass
class PredictionSet:
    """One split's saved predictions: the manifest, the sample ids (row order) and the arrays.

    `arrays[name]` is a stacked numpy array (memory-mapped when read from disk) or a list with
    one array per sample (loaded on access when read from disk)."""

    manifest: dict
    ids: list[str]
    arrays: dict[str, Any]
    folder: Path | None = None
    _rows: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    def role(self, name: str) -> str:
        return self.manifest["arrays"][name].get("role", "prediction")

    def row(self, sample_id: str) -> int:
        if not self._rows:
            self._rows = {id_: i for i, id_ in enumerate(self.ids)}
        if sample_id not in self._rows:
            raise UserError(f"{self._where()}: no sample with id {sample_id!r}.")
        return self._rows[sample_id]

    def sample(self, name: str, sample_id: str) -> np.ndarray:
        return np.asarray(self.arrays[name][self.row(sample_id)])

    def _where(self) -> str:
        return str(self.folder) if self.folder is not None else "combined predictions"

    def write(self, folder) -> Path:
        # a combined set reads its members' files lazily: writing over one would delete them first
        sources = [*self.manifest.get("combined_from", []), *self.manifest.get("concatenated_from", [])]
        if any(Path(s).resolve() == Path(folder).resolve() for s in sources):
            raise UserError(f"{folder}: holds one of the sets being combined; write the result to a new folder.")
        meta = {k: v for k, v in self.manifest.items() if k not in ("format", "kind", "count", "index", "arrays")}
        arrays = {n: a for n, a in self.arrays.items() if self.role(n) == "prediction"}
        truth = {n: a for n, a in self.arrays.items() if self.role(n) != "prediction"}
        return write_predictions(folder, self.kind, self.ids, arrays, truth=truth, **meta)


class _LazyFiles(Sequence):
    """Per-sample arrays loaded from their files on access (a mask set can exceed memory)."""

    def __init__(self, paths: list[Path], key: str | None = None):
        self.paths, self.key = paths, key

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        path = self.paths[i]
        if not path.is_file():
            raise UserError(f"{path}: prediction file listed in the manifest is missing.")
        if self.key is not None:  # a referenced HDF5 file (reconstruction volumes)
            import h5py

            with h5py.File(path, "r") as f:
                return f[self.key][()]
        return np.load(path, mmap_mode="r")


class _Reduced(Sequence):
    """`combine`'s per-sample result, reduced on access from the members' aligned rows: one
    sample of each member in memory at a time (a set of MRI volumes can exceed memory)."""

    def __init__(self, per_set: list, w: np.ndarray, how: str, kind: str):
        self.per_set, self.w, self.how, self.kind = per_set, w, how, kind

    def __len__(self):
        return len(self.per_set[0])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return _reduce([np.asarray(p[i]) for p in self.per_set], self.w, self.how, self.kind)


def _clear_previous(folder: Path) -> None:
    """Remove the files a previous manifest in `folder` wrote (never referenced files)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return
    try:
        old = json.loads(manifest.read_text())
    except (OSError, ValueError):
        old = {}
    manifest.unlink()
    for spec in (old.get("arrays") or {}).values():
        if "file" in spec:
            (folder / spec["file"]).unlink(missing_ok=True)
        elif "dir" in spec and (folder / spec["dir"]).is_dir():
            for p in (folder / spec["dir"]).glob("*.npy"):
                p.unlink()


def write_predictions(folder, kind: str, ids: Sequence[str], arrays: dict[str, Any],
                      truth: dict[str, Any] | None = None, references: dict[str, dict] | None = None,
                      **meta) -> Path:
    """Write one split's prediction set into `folder`; return the manifest's path.

    `arrays` (role "prediction") and `truth` (role "truth") map a name to a stacked array whose
    first axis has one row per id, or to a list of per-sample arrays (sizes may differ).
    `references` maps a name to {"files": [paths], "key": dataset} of existing files, one per
    id, recorded in place. `meta` goes into the manifest (split, task, classes, meaning...).
    The manifest is written last, atomically: a reader never sees a half-written set."""
    if kind not in KINDS:
        raise ValueError(f"unknown prediction kind {kind!r}; kinds: {', '.join(KINDS)}")
    folder = Path(folder)
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"{folder}: duplicate sample ids {dup}")
    folder.mkdir(parents=True, exist_ok=True)
    _clear_previous(folder)
    specs: dict[str, dict] = {}
    for role, group in (("prediction", arrays), ("truth", truth or {})):
        for name, value in group.items():
            if len(value) != len(ids):
                raise ValueError(f"{folder}: array {name!r} has {len(value)} rows for {len(ids)} ids")
            if isinstance(value, (list, tuple, _LazyFiles, _Reduced)):
                (folder / name).mkdir(exist_ok=True)
                dtypes = set()
                for row, a in enumerate(value):
                    a = np.asarray(a)
                    dtypes.add(str(a.dtype))
                    np.save(folder / name / f"{row:06d}.npy", a)
                specs[name] = {"dir": name, "dtype": "/".join(sorted(dtypes)), "role": role}
            else:
                a = np.asarray(value)
                np.save(folder / f"{name}.npy", a)
                specs[name] = {"file": f"{name}.npy", "shape": list(a.shape), "dtype": str(a.dtype), "role": role}
    for name, ref in (references or {}).items():
        files = [os.path.relpath(Path(p), folder) for p in ref["files"]]
        if len(files) != len(ids):
            raise ValueError(f"{folder}: reference {name!r} has {len(files)} files for {len(ids)} ids")
        specs[name] = {"files": files, "key": ref.get("key"), "role": ref.get("role", "prediction")}
    with (folder / INDEX).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "id"])
        writer.writerows(enumerate(ids))
    manifest = {"format": FORMAT, "kind": kind, **meta, "count": len(ids), "index": INDEX, "arrays": specs}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=_jsonable))
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def read_predictions(folder) -> PredictionSet:
    """Read a split's prediction set; arrays are memory-mapped / loaded lazily. UserError names
    the file when the manifest, the index or an array is missing or does not match."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: no prediction manifest (a folder written by `podium train` / `podium eval` "
                        f"under RUN/predictions/<split>/ was expected).")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: corrupt prediction manifest ({e}).") from None
    missing = [k for k in ("format", "kind", "count", "arrays") if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise UserError(f"{path}: prediction manifest lacks {', '.join(missing)}.")
    if manifest["format"] != FORMAT or manifest["kind"] not in KINDS:
        raise UserError(f"{path}: format {manifest['format']!r} kind {manifest['kind']!r}; this podium reads "
                        f"format {FORMAT} with kinds {', '.join(KINDS)}.")
    index = folder / manifest.get("index", INDEX)
    try:
        with index.open(newline="") as f:
            rows = list(csv.reader(f))[1:]
        ids = [r[1] for r in rows]
    except (OSError, IndexError) as e:
        raise UserError(f"{index}: unreadable prediction index ({e}).") from None
    if len(ids) != manifest["count"]:
        raise UserError(f"{index}: {len(ids)} ids, the manifest says {manifest['count']}.")
    arrays: dict[str, Any] = {}
    for name, spec in manifest["arrays"].items():
        if "file" in spec:
            file = folder / spec["file"]
            try:
                arrays[name] = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise UserError(f"{file}: unreadable prediction array ({e}).") from None
            if list(arrays[name].shape) != list(spec.get("shape", arrays[name].shape)) or len(arrays[name]) != len(ids):
                raise UserError(f"{file}: shape {list(arrays[name].shape)} does not match the manifest "
                                f"({spec.get('shape')}, {len(ids)} ids).")
        elif "dir" in spec:
            arrays[name] = _LazyFiles([folder / spec["dir"] / f"{row:06d}.npy" for row in range(len(ids))])
        else:
            arrays[name] = _LazyFiles([folder / p for p in spec["files"]], key=spec.get("key"))
    return PredictionSet(manifest, ids, arrays, folder)


# ---- combining (ensembles, TTA over saved sets, CV folds) --------------------------------------


def _name(s: PredictionSet) -> str:
    return s._where()


def _check_compatible(sets: list[PredictionSet]) -> None:
    first = sets[0]
    for s in sets[1:]:
        for key in ("kind", "classes", "landmarks"):
            if first.manifest.get(key) != s.manifest.get(key):
                raise UserError(f"cannot combine {_name(first)} and {_name(s)}: different {key} "
                                f"({first.manifest.get(key)!r} vs {s.manifest.get(key)!r}).")
        if set(first.ids) != set(s.ids):
            only_a, only_b = sorted(set(first.ids) - set(s.ids)), sorted(set(s.ids) - set(first.ids))
            raise UserError(f"cannot combine {_name(first)} and {_name(s)}: different samples "
                            f"(only in the first: {only_a[:5]} ({len(only_a)}); only in the second: "
                            f"{only_b[:5]} ({len(only_b)})).")
        if set(first.manifest["arrays"]) != set(s.manifest["arrays"]):
            raise UserError(f"cannot combine {_name(first)} and {_name(s)}: different arrays "
                            f"({sorted(first.manifest['arrays'])} vs {sorted(s.manifest['arrays'])}).")


def _weights(weights, n: int) -> np.ndarray:
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise UserError(f"ensemble weights {weights!r}: expected {n} non-negative numbers, not all zero.")
    return w / w.sum()


def _reduce(parts: list[np.ndarray], w: np.ndarray, how: str, kind: str) -> np.ndarray:
    """Weighted mean (or geometric mean) of aligned arrays, in float64, back in the input's
    float dtype. Class axis: last for stacked class_probs, first for a multi-class mask (C, H, W);
    a 2-D mask holds the binary foreground probability (its background is 1 - p)."""
    dtype = parts[0].dtype if parts[0].dtype.kind == "f" else np.dtype(np.float32)
    x = [p.astype(np.float64) for p in parts]
    if how == "mean":
        return sum(wi * p for wi, p in zip(w, x)).astype(dtype)
    eps = 1e-7
    if kind == "mask_probs" and x[0].ndim == 2:
        fg = np.exp(sum(wi * np.log(np.clip(p, eps, 1.0)) for wi, p in zip(w, x)))
        bg = np.exp(sum(wi * np.log(np.clip(1.0 - p, eps, 1.0)) for wi, p in zip(w, x)))
        return (fg / (fg + bg)).astype(dtype)
    axis = -1 if kind == "class_probs" else 0
    g = np.exp(sum(wi * np.log(np.clip(p, eps, 1.0)) for wi, p in zip(w, x)))
    return (g / g.sum(axis=axis, keepdims=True)).astype(dtype)


def combine(sets: Sequence[PredictionSet], weights: Sequence[float] | None = None, how: str = "mean") -> PredictionSet:
    """Weighted average of prediction sets of one kind, aligned by sample id (rows follow the
    first set). how="mean" averages probabilities, points, images; how="geometric" (class_probs,
    mask_probs) takes the weighted geometric mean, renormalised. Truth arrays must agree."""
    sets = list(sets)
    if not sets:
        raise UserError("nothing to combine: no prediction sets given.")
    if how not in ("mean", "geometric"):
        raise UserError(f"combine how={how!r}: expected mean or geometric.")
    if how == "geometric" and sets[0].kind not in ("class_probs", "mask_probs"):
        raise UserError(f"the geometric mean applies to probabilities, not to {sets[0].kind}.")
    _check_compatible(sets)
    w = _weights(weights, len(sets))
    first = sets[0]
    order = [[s.row(i) for i in first.ids] for s in sets]
    out: dict[str, Any] = {}
    for name, spec in first.manifest["arrays"].items():
        per_set = [_aligned(s.arrays[name], rows) for s, rows in zip(sets, order)]
        if first.role(name) != "prediction":
            for s, values in zip(sets[1:], per_set[1:]):
                if not all(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=np.asarray(a).dtype.kind == "f")
                           for a, b in zip(per_set[0], values)):
                    raise UserError(f"cannot combine {_name(first)} and {_name(s)}: their {name!r} "
                                    f"(ground truth) differ.")
            out[name] = per_set[0]
            continue
        if "file" in spec:  # stacked: one vectorised reduction, class axis last
            out[name] = _reduce([np.asarray(p) for p in per_set], w, how, first.kind)
        else:
            out[name] = _Reduced(per_set, w, how, first.kind)  # lazy: written / scored one sample at a time
    manifest = {k: v for k, v in first.manifest.items() if k != "arrays"}
    manifest["arrays"] = {n: ({k: v for k, v in first.manifest["arrays"][n].items() if k != "files"}
                              | ({"dir": n} if "files" in first.manifest["arrays"][n] else {}))
                          for n in first.manifest["arrays"]}
    manifest["combined_from"] = [_name(s) for s in sets]
    manifest["weights"] = w.tolist()
    manifest["combine"] = how
    return PredictionSet(manifest, list(first.ids), out, None)


def _aligned(values, rows: list[int]):
    if isinstance(values, np.ndarray):
        return values[np.asarray(rows, dtype=np.int64)] if rows else values[:0]
    if isinstance(values, _LazyFiles):  # stays lazy: files are read when a row is used
        return _LazyFiles([values.paths[r] for r in rows], values.key)
    return [values[r] for r in rows]


def concat(sets: Sequence[PredictionSet]) -> PredictionSet:
    """The rows of several sets of one kind over disjoint samples, one after the other (the
    out-of-fold predictions of k CV folds). Same kind, classes / landmarks and arrays required;
    an id in two sets, or stacked arrays whose per-sample shapes differ, is a UserError."""
    sets = list(sets)
    if not sets:
        raise UserError("nothing to concatenate: no prediction sets given.")
    first = sets[0]
    seen: dict[str, str] = {}
    for s in sets:
        for key in ("kind", "classes", "landmarks"):
            if first.manifest.get(key) != s.manifest.get(key):
                raise UserError(f"cannot concatenate {_name(first)} and {_name(s)}: different {key} "
                                f"({first.manifest.get(key)!r} vs {s.manifest.get(key)!r}).")
        if set(first.manifest["arrays"]) != set(s.manifest["arrays"]):
            raise UserError(f"cannot concatenate {_name(first)} and {_name(s)}: different arrays "
                            f"({sorted(first.manifest['arrays'])} vs {sorted(s.manifest['arrays'])}).")
        for id_ in s.ids:
            if id_ in seen:
                raise UserError(f"cannot concatenate {seen[id_]} and {_name(s)}: both hold sample {id_!r} "
                                "(out-of-fold sets must cover disjoint samples).")
            seen[id_] = _name(s)
    out: dict[str, Any] = {}
    for name in first.manifest["arrays"]:
        parts = [s.arrays[name] for s in sets]
        if all(isinstance(p, np.ndarray) for p in parts):
            shapes = {p.shape[1:] for p in parts}
            if len(shapes) > 1:
                raise UserError(f"cannot concatenate {name!r}: per-sample shapes differ {sorted(shapes)} "
                                f"({', '.join(_name(s) for s in sets)}).")
            out[name] = np.concatenate([np.asarray(p) for p in parts])
        elif all(isinstance(p, _LazyFiles) for p in parts) and len({p.key for p in parts}) == 1:
            out[name] = _LazyFiles([path for p in parts for path in p.paths], parts[0].key)  # still lazy
        else:
            out[name] = [row for p in parts for row in (p if isinstance(p, np.ndarray) else list(p))]
    manifest = {k: v for k, v in first.manifest.items() if k not in ("arrays", "count")}
    for key, value in manifest.items():  # per-sample metadata ({id: value}, e.g. acceleration): every set's rows
        if isinstance(value, dict) and value and set(value) <= set(first.ids):
            manifest[key] = {i: v for s in sets for i, v in (s.manifest.get(key) or {}).items()}
    manifest["arrays"] = {n: ({k: v for k, v in spec.items() if k not in ("files", "file", "shape")}
                              | ({"file": f"{n}.npy"} if isinstance(out[n], np.ndarray) else {"dir": n}))
                          for n, spec in first.manifest["arrays"].items()}
    manifest["count"] = len(seen)
    manifest["concatenated_from"] = [_name(s) for s in sets]
    return PredictionSet(manifest, [i for s in sets for i in s.ids], out, None)
