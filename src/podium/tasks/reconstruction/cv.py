"""Cross-validation folds for reconstruction (the `cv_keys` / `cv_subset` hooks of the task).

    podium cv experiment=varnet_demo cv.folds=3 --out runs/cv-varnet

The pool is the train and val splits' slices, one key per slice: {"id": "<volume>:<slice>",
"volume": "<volume>"}, the volume being the file stem that names the saved predictions
(`<volume>_acc<N>`, one row per volume and acceleration). The folds are always grouped by
volume (`cv.group_by` defaults to it; any other grouping is refused): a volume split across
folds would be predicted by two models and its OOF rows would clash. A fold trains on its
slices with the training mask policy (fresh, optionally augmented masks) and holds the others
out with the evaluation policy (the seeded mask bank, or the files' own masks), as val is.

Simulated data (`data=simulated_mri`) has no fixed training slices: its source images are the
pool, grouped into volumes `train_<k>` (simulated_data.pool_slices); a fold's training
simulates fresh slices from the images it keeps, and its held-out images are materialised
once as fastMRI HDF5 volumes (simulated_data.materialise_pool_volumes) beside the val ones.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import ConcatDataset

from podium.errors import UserError

GROUP = "volume"


def require_volume_groups(cfg) -> None:
    """Folds of this family are grouped by volume: cv.group_by defaults to "volume" (set on the
    run's config, so config.yaml and splits.json record it); another column is a UserError."""
    cv = cfg.get("cv") if hasattr(cfg, "get") else None
    if cv is None:
        return
    if cv.get("group_by") is None:
        cv.group_by = GROUP
    elif cv.group_by != GROUP:
        raise UserError(f"cv.group_by={cv.group_by!r}: reconstruction folds are grouped by volume (a volume's "
                        f"slices are saved and scored together); use cv.group_by={GROUP} or leave it out.")


def cv_keys(cfg, dataset) -> list[dict]:
    """One key per slice of a train or val split, in the order `cv_subset`'s picks index."""
    from podium.tasks.reconstruction.simulated_data import SimulatedSlices, pool_slices

    require_volume_groups(cfg)
    if isinstance(dataset, SimulatedSlices):
        pairs = pool_slices(dataset)
    elif hasattr(dataset, "slices"):  # SliceDataset, SNUDataset: (VolumeInfo, slice) pairs
        pairs = [(Path(info.path).stem, int(s)) for info, s in dataset.slices]
    else:
        raise UserError(f"a {type(dataset).__name__} split cannot be cross-validated (its samples are not "
                        "slices of volumes).")
    return [{"id": f"{volume}:{s}", GROUP: volume} for volume, s in pairs]


class TrainFold(ConcatDataset):
    """Fresh simulations from the kept images plus the kept val volumes' slices (train masks);
    the epoch reaches both (mask augmentation ramps over epochs)."""

    def set_epoch(self, epoch: int) -> None:
        for part in self.datasets:
            part.set_epoch(epoch)


def cv_subset(cfg, parts, picks, train: bool):
    """The fold's train (train policy) or held-out (eval policy) slices of `parts` = [train, val]."""
    from podium.tasks.reconstruction.data import slice_subset
    from podium.tasks.reconstruction.simulated_data import SimulatedSlices

    train_part, val_part = parts
    if isinstance(train_part, SimulatedSlices):
        return _simulated_subset(train_part, val_part, picks, train)
    slices = [parts[p].slices[i] for p, i in picks]
    names = list(dict.fromkeys([*train_part.volume_names, *val_part.volume_names]))
    base = train_part if train else val_part
    return slice_subset(base, slices, train_part.policy if train else val_part.policy, names)


def _simulated_subset(sims, val_part, picks, train: bool):
    import copy

    from podium.tasks.reconstruction.data import SliceDataset, _cache_dir, slice_subset
    from podium.tasks.reconstruction.simulated_data import materialise_pool_volumes, pool_slices

    images = [i for p, i in picks if p == 0]
    val_slices = [val_part.slices[i] for p, i in picks if p == 1]
    if train:
        out = []
        if images:
            kept = copy.copy(sims)  # same size per epoch, parameters, coil maps and mask policy
            kept.images = [sims.images[i] for i in images]
            out.append(kept)
        if val_slices:
            out.append(slice_subset(val_part, val_slices, sims.policy, val_part.volume_names))
        return out[0] if len(out) == 1 else TrainFold(out)
    if not images:
        return slice_subset(val_part, val_slices, val_part.policy, val_part.volume_names)
    pool = pool_slices(sims)
    held = {pool[i] for i in images}
    names = list(dict.fromkeys(pool[i][0] for i in images))
    files = materialise_pool_volumes(sims, names)
    volumes = SliceDataset(files, sims.cfg, val_part.policy, _cache_dir(sims.cfg), val_part.symmetric_centre)
    slices = [(info, s) for info, s in (volumes.index[i] for i in range(len(volumes.index)))
              if (Path(info.path).stem, int(s)) in held]
    return slice_subset(volumes, slices + val_slices, val_part.policy,
                        [*volumes.volume_names, *val_part.volume_names])
