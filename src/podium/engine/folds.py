"""k-fold cross-validation: folds made once, persisted as `splits.json`, applied to a run.

The pool is the union of a dataset's train and val splits; test splits are never pooled. Each
sample of the pool has a key from its task (`Task.cv_keys`): its id (the prediction contract's
sample id), a label to stratify on where there is one, and grouping columns (patient,
volume...). `make_folds` assigns every id to one fold with scikit-learn (Pedregosa et al., JMLR
2011): StratifiedKFold with labels, StratifiedGroupKFold with labels and `group_by`, GroupKFold
with groups only, KFold otherwise; shuffled by `seed`. A run with `cv.fold=k` holds fold k out
as its "val" split (eval preprocessing) and trains on the rest (train augmentation), so the val
predictions it saves are the out-of-fold predictions of fold k.

    from podium.engine.folds import make_folds, write_splits, read_splits
    keys = [{"id": "a", "label": 0, "patient": "p1"}, {"id": "b", "label": 1, "patient": "p2"}, ...]
    write_splits("runs/cv/splits.json", make_folds(keys, n_folds=5, seed=0, group_by="patient"))
    splits = read_splits("runs/cv/splits.json", keys)      # UserError naming the file on a mismatch

    podium train experiment=digits cv.folds=5 cv.fold=0     # one fold, folds made from cv.seed
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from torch.utils.data import Dataset

from podium.errors import UserError

FORMAT = 1
POOL_SPLITS = ("train", "val")


# ---- keys and folds -------------------------------------------------------------------------


def pool_keys(task, datasets: dict) -> tuple[list[dict], list[tuple[int, int]]]:
    """The pool's keys (train then val) and, for each, its pick: (part number, index in it)."""
    keys, picks = [], []
    for part, split in enumerate(POOL_SPLITS):
        if split not in datasets:
            raise UserError(f"cross-validation pools the train and val splits; the dataset has no {split!r} split.")
        for index, key in enumerate(task.cv_keys(datasets[split])):
            if "id" not in key:
                raise ValueError(f"{type(task).__name__}.cv_keys gave a key without an 'id': {key}")
            keys.append({**key, "id": str(key["id"])})
            picks.append((part, index))
    ids = [k["id"] for k in keys]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise UserError(f"cross-validation needs distinct sample ids across train and val; repeated: {dup}.")
    return keys, picks


def make_folds(keys: Sequence[dict], n_folds: int, seed: int = 0, group_by: str | None = None) -> dict:
    """Assign every key's id to one of `n_folds` folds: {"format", "folds", "seed", "group_by",
    "method", "pool": [ids], "ids": {"0": [ids], ...}} (what `write_splits` stores)."""
    import numpy as np
    from sklearn import model_selection as ms

    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 2:
        raise UserError(f"cv.folds={n_folds!r}: cross-validation needs at least 2 folds.")
    ids = [str(k["id"]) for k in keys]
    if n_folds > len(ids):
        raise UserError(f"cv.folds={n_folds} is more than the {len(ids)} samples of the train and val splits.")
    labels = [k.get("label") for k in keys]
    stratified = bool(ids) and all(v is not None for v in labels)
    groups = None
    if group_by:
        missing = [k for k in keys if k.get(group_by) is None]
        if missing:
            columns = sorted({c for k in keys for c in k if c != "label"})
            raise UserError(f"cv.group_by={group_by!r}: sample {missing[0]['id']!r} has no such column; "
                            f"columns this dataset offers: {', '.join(columns)}.")
        groups = np.array([str(k[group_by]) for k in keys])
        if n_folds > len(set(groups)):
            raise UserError(f"cv.folds={n_folds} is more than the {len(set(groups))} distinct {group_by} values.")
    y = np.array([str(v) for v in labels]) if stratified else None
    if stratified and groups is not None:
        splitter = ms.StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed)
    elif stratified:
        splitter = ms.StratifiedKFold(n_folds, shuffle=True, random_state=seed)
    elif groups is not None:
        try:
            splitter = ms.GroupKFold(n_folds, shuffle=True, random_state=seed)
        except TypeError:  # scikit-learn < 1.6: no shuffle, folds balanced by group size
            splitter = ms.GroupKFold(n_folds)
    else:
        splitter = ms.KFold(n_folds, shuffle=True, random_state=seed)
    try:
        held_out = [test for _, test in splitter.split(np.zeros(len(ids)), y, groups)]
    except ValueError as err:  # e.g. more folds than the members of every class
        raise UserError(f"cannot make {n_folds} folds ({type(splitter).__name__}): {err}") from None
    return {"format": FORMAT, "folds": n_folds, "seed": int(seed), "group_by": group_by,
            "method": type(splitter).__name__, "pool": ids,
            "ids": {str(k): [ids[i] for i in sorted(test)] for k, test in enumerate(held_out)}}


def write_splits(path, splits: dict) -> Path:
    """Write splits.json atomically (a crash never leaves half a file for the next run)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(splits, indent=1))
    os.replace(tmp, path)
    return path


def read_splits(path, keys: Sequence[dict] | None = None) -> dict:
    """Read and check a splits.json; with `keys`, its pool must be exactly their ids. Every
    problem is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"cv.splits={path}: no such file (a splits.json written by `podium cv`).")
    try:
        splits = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable splits.json ({err}).") from None
    if not isinstance(splits, dict) or not isinstance(splits.get("ids"), dict) or not isinstance(splits.get("pool"), list):
        raise UserError(f"{path}: expected a splits.json with 'folds', 'pool' and 'ids' (fold -> sample ids).")
    n = splits.get("folds")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2 or sorted(splits["ids"]) != sorted(map(str, range(n))):
        raise UserError(f"{path}: 'folds' is {n!r} but 'ids' has folds {sorted(splits['ids'])}; expected folds 0..N-1, N >= 2.")
    seen: dict[str, str] = {}
    for fold, ids in splits["ids"].items():
        for id_ in ids:
            if id_ in seen:
                raise UserError(f"{path}: sample {id_!r} is in fold {seen[id_]} and fold {fold}; folds must be disjoint.")
            seen[id_] = fold
    if set(seen) != set(splits["pool"]) or len(seen) != len(splits["pool"]):
        raise UserError(f"{path}: the folds hold {len(seen)} ids, the pool {len(splits['pool'])}; they must be the same ids.")
    if keys is not None:
        data = {str(k["id"]) for k in keys}
        missing, extra = sorted(data - set(seen)), sorted(set(seen) - data)
        if missing or extra:
            raise UserError(f"{path} does not fit this data's train and val splits: {len(missing)} sample(s) in "
                            f"no fold (e.g. {missing[:3]}), {len(extra)} id(s) not in the data (e.g. {extra[:3]}). "
                            "Make new folds (another --out, or delete the file) for other data.")
    return splits


# ---- applying one fold ----------------------------------------------------------------------


def fold_picks(splits: dict, keys: Sequence[dict], picks: Sequence[tuple[int, int]], fold: int
               ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train picks, held-out picks) of `fold`, both in pool order."""
    held = set(splits["ids"][str(fold)])
    train = [p for k, p in zip(keys, picks) if k["id"] not in held]
    val = [p for k, p in zip(keys, picks) if k["id"] in held]
    return train, val


def resolve_splits(cv_cfg, keys: Sequence[dict]) -> dict:
    """The folds a config asks for: cv.splits read and checked, else made from cv.folds/seed."""
    if cv_cfg.splits:
        splits = read_splits(cv_cfg.splits, keys)
        if cv_cfg.folds and cv_cfg.folds != splits["folds"]:
            raise UserError(f"cv.folds={cv_cfg.folds} but {cv_cfg.splits} has {splits['folds']} folds; "
                            "leave cv.folds out (0) to take the file's, or make new folds.")
        if cv_cfg.group_by and cv_cfg.group_by != splits.get("group_by"):
            raise UserError(f"cv.group_by={cv_cfg.group_by!r} but {cv_cfg.splits} was grouped by "
                            f"{splits.get('group_by')!r}; make new folds for another grouping.")
        return splits
    if cv_cfg.folds < 2:
        raise UserError(f"cv.fold={cv_cfg.fold} needs cv.folds >= 2 (got {cv_cfg.folds}) or cv.splits=FILE.")
    return make_folds(keys, int(cv_cfg.folds), int(cv_cfg.seed), cv_cfg.group_by)


def apply_fold(task, datasets: dict, cv_cfg) -> dict:
    """Datasets for the run that holds fold `cv_cfg.fold` out: "val" is that fold (eval
    preprocessing), "train" the other folds (train augmentation), other splits unchanged. The
    task keeps them as its own datasets, so its hooks (ids, plots, saved predictions) see the
    fold. Without `cv_cfg.fold` the datasets come back unchanged."""
    if cv_cfg is None or cv_cfg.fold is None:
        return datasets
    if getattr(task, "cv_fold", None) is not None:  # already applied to this task
        return datasets
    keys, picks = pool_keys(task, datasets)
    splits = resolve_splits(cv_cfg, keys)
    fold = int(cv_cfg.fold)
    if not 0 <= fold < splits["folds"]:
        raise UserError(f"cv.fold={fold} is out of range: the folds are 0..{splits['folds'] - 1}.")
    train, val = fold_picks(splits, keys, picks, fold)
    parts = [datasets[s] for s in POOL_SPLITS]
    out = dict(datasets)
    out["train"] = task.cv_subset(parts, train, train=True)
    out["val"] = task.cv_subset(parts, val, train=False)
    task._datasets = out  # every family's build_datasets returns its cached `_datasets`
    task.cv_fold = {"fold": fold, "folds": splits["folds"], "train": len(train), "val": len(val)}
    return out


class PickedSamples(Dataset):
    """The picked samples of several datasets (`picks`: (part, index)), in pick order; each
    part's `sample_id` and `targets` follow, other attributes (classes, in_chans...) are the
    first part's."""

    def __init__(self, parts: Sequence[Any], picks: Sequence[tuple[int, int]]):
        self.parts, self.picks = list(parts), [(int(p), int(i)) for p, i in picks]
        if all(hasattr(p, "targets") for p in self.parts):
            self.targets = [self.parts[p].targets[i] for p, i in self.picks]

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, index: int):
        part, i = self.picks[index]
        return self.parts[part][i]

    def sample_id(self, index: int) -> str:
        part, i = self.picks[index]
        return self.parts[part].sample_id(i)

    def __getattr__(self, name):
        if name in ("parts", "picks"):  # not set yet (unpickling in a loader worker): no recursion
            raise AttributeError(name)
        return getattr(self.parts[0], name)
