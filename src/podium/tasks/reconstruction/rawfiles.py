"""Raw multi-coil k-space files: MATLAB `.mat` (v5 through scipy, v7.3 through h5py), `.npy` /
`.npz` and BART `.cfl`/`.hdr`, read as complex64 `(coils, H, W)` with the axis order stated.

    from podium.tasks.reconstruction.rawfiles import read_kspace_file
    k = read_kspace_file("../shared/data/mri/espirit_brain_8ch.mat")   # (8, 320, 256)
    k = read_kspace_file("../shared/data/mri/bart_brain_undersampled/ksp", axes="bart")
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from podium.errors import UserError
from podium.tasks.reconstruction.readers import PathLike, _require_complex, _require_finite

__all__ = ["read_cfl", "read_kspace_file", "write_cfl"]


def write_cfl(base_path: PathLike, array: np.ndarray) -> None:
    """BART pair `base.hdr` (dims) + `base.cfl` (complex64, Fortran order)."""
    base = _cfl_base(base_path)
    array = np.asarray(array, dtype=np.complex64)
    base.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(map(str, array.shape)) + "\n")
    array.ravel(order="F").tofile(base.with_suffix(".cfl"))


def _cfl_base(path: PathLike) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".cfl", ".hdr") else path


def read_cfl(base_path: PathLike) -> np.ndarray:
    """BART `.cfl` as complex64 in BART's dimension order (trailing singleton dims dropped)."""
    base = _cfl_base(base_path)
    hdr, cfl = base.with_suffix(".hdr"), base.with_suffix(".cfl")
    for p in (hdr, cfl):
        if not p.is_file():
            raise UserError(f"{p} does not exist (BART data is a .cfl + .hdr pair).")
    lines = hdr.read_text().splitlines()
    try:  # the dims follow the "# Dimensions" line (the second line of BART's own headers)
        dims = [int(v) for v in lines[lines.index("# Dimensions") + 1].split()]
    except (ValueError, IndexError):
        raise UserError(f"{hdr}: expected a '# Dimensions' line followed by integers.") from None
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    data = np.fromfile(cfl, dtype=np.complex64)
    if data.size != int(np.prod(dims)):
        raise UserError(f"{cfl}: {data.size} complex values, but {hdr} declares dims {dims} "
                        f"({int(np.prod(dims))} values).")
    return data.reshape(dims, order="F")


def _load_mat(path: Path, key: str | None) -> tuple[np.ndarray, str]:
    if h5py.is_hdf5(path):  # MATLAB v7.3 is HDF5 behind a 512-byte text header
        with h5py.File(path, "r") as f:
            names = [n for n in f if not n.startswith("#")]
            key = _choose_key(path, names, key)
            array = f[key][()]
        if array.dtype.names and {"real", "imag"} <= set(array.dtype.names):
            array = array["real"] + 1j * array["imag"]
        return array.T, key  # MATLAB is column-major: HDF5 sees the axes reversed
    import scipy.io

    try:
        names = [name for name, _, _ in scipy.io.whosmat(path)]
        key = _choose_key(path, names, key)
        return scipy.io.loadmat(path, variable_names=[key])[key], key
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise UserError(f"{path} is not a readable MATLAB file ({exc}).") from None


def _choose_key(path: Path, names: Sequence[str], key: str | None) -> str:
    names = [n for n in names if not n.startswith("__")]
    if key is not None:
        if key not in names:
            raise UserError(f"{path}: no variable {key!r}; variables: {names}.")
        return key
    if len(names) != 1:
        raise UserError(f"{path}: {len(names)} variables {names}; pass key= to pick one.")
    return names[0]


def _bart_axes(shape: tuple[int, ...], where: str) -> str:
    """BART dims are [read, phase1, phase2, coil, maps, ...]. A 2-D slice has read == 1 (an
    already transformed readout; H = phase1, W = phase2) or phase2 == 1 (H = read, W = phase1)."""
    read, _, phase2 = (tuple(shape) + (1, 1, 1))[:3]
    if any(n != 1 for n in shape[4:]):
        raise UserError(f"{where}: BART dims {shape} hold more than [read, phase1, phase2, coil].")
    if read == 1:
        letters = "1HWC"
    elif phase2 == 1:
        letters = "HW1C"
    else:
        raise UserError(f"{where}: BART dims {shape} are a 3-D acquisition; pick one slice first.")
    return letters + "1" * (len(shape) - 4)  # the caller pads `shape` to at least 4 dims


def _arrange(array: np.ndarray, axes: str, where: str) -> np.ndarray:
    """Reorder `array` to (C, H, W) following `axes` (see `read_kspace_file`)."""
    if axes.lower() == "auto":
        squeezed = np.squeeze(array)
        if squeezed.ndim == 2:
            return squeezed[None]
        if squeezed.ndim != 3:
            raise UserError(f"{where}: expected 2-D or 3-D k-space after dropping singleton dims, "
                            f"got shape {array.shape}; pass axes= (e.g. 'HWC').")
        sizes = sorted(squeezed.shape)
        if sizes[0] == sizes[1]:
            raise UserError(f"{where}: shape {array.shape} has no single smallest (coil) axis; "
                            "pass axes= (e.g. 'HWC').")
        return np.moveaxis(squeezed, int(np.argmin(squeezed.shape)), 0)
    if axes.lower() == "bart":
        array = array.reshape(array.shape + (1,) * max(0, 4 - array.ndim))
        axes = _bart_axes(array.shape, where)
    letters = axes.upper()
    if len(letters) != array.ndim or set(letters) - set("HWC1"):
        raise UserError(f"{where}: axes={axes!r} must name each of the {array.ndim} axes of shape "
                        f"{array.shape} with H, W, C or 1.")
    if letters.count("H") != 1 or letters.count("W") != 1 or letters.count("C") > 1:
        raise UserError(f"{where}: axes={axes!r} needs exactly one H, one W and at most one C.")
    singles = [i for i, a in enumerate(letters) if a == "1"]
    if any(array.shape[i] != 1 for i in singles):
        raise UserError(f"{where}: axes={axes!r} marks a non-singleton axis of {array.shape} as 1.")
    array, letters = np.squeeze(array, axis=tuple(singles)), letters.replace("1", "")
    if "C" not in letters:
        array, letters = array[None], "C" + letters
    return np.transpose(array, [letters.index(a) for a in "CHW"])


def _load_numpy(path: Path, key: str | None) -> tuple[np.ndarray, str | None, str]:
    """A .npy / .npz array; pickled (object) arrays are refused, never unpickled: they can run
    code, and they are not k-space (e.g. a landmark table saved with allow_pickle)."""
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False), key, str(path)
        with np.load(path, allow_pickle=False) as archive:
            key = _choose_key(path, list(archive.files), key)
            return archive[key], key, f"{path}, key {key!r}"
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not a numeric k-space array ({exc}); the reconstruction task expects "
                        "complex multi-coil k-space (coils, H, W), saved without pickling.") from None


def read_kspace_file(path: PathLike, key: str | None = None, axes: str = "auto") -> np.ndarray:
    """One slice of multi-coil k-space from `.mat` (v5 via scipy, v7.3 via h5py), `.npy`,
    `.npz` or BART `.cfl`/`.hdr`, as complex64 (C, H, W).

    `key` picks the variable of a `.mat`/`.npz` (default: the only one). `axes` names every
    input axis: H (readout, rows), W (phase encode, columns), C (coils), 1 (a singleton to
    drop), e.g. "HWC" for MATLAB's readout x phase x coils, "CHW", or "1HWC". "bart" applies
    BART's order [read, phase1, phase2, coil] (see `_bart_axes`). "auto" drops every singleton
    axis, then takes a 2-D array as one coil, and in a 3-D array the smallest axis as the coils
    (moved first, the other two keep their order as H, W); anything else needs an explicit
    `axes`. For BART files "auto" and "bart" agree on 2-D slices: dims 1 x 180 x 230 x 8 give
    (8, 180, 230) with H = phase1, W = phase2.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".cfl", ".hdr") or (not suffix and path.with_suffix(".cfl").is_file()):
        array, key, where = read_cfl(path), None, str(_cfl_base(path).with_suffix(".cfl"))
    elif not path.is_file():
        raise UserError(f"{path} does not exist.")
    elif suffix == ".mat":
        array, key = _load_mat(path, key)
        where = f"{path}, key {key!r}"
    elif suffix in (".npy", ".npz"):
        array, key, where = _load_numpy(path, key)
    else:
        raise UserError(f"{path}: unsupported k-space file type {suffix!r} "
                        "(supported: .mat, .npy, .npz, .cfl/.hdr; fastMRI .h5 via read_slice).")
    _require_complex(array, where)
    kspace = _arrange(array, axes, where).astype(np.complex64)
    _require_finite(kspace, where)
    return np.ascontiguousarray(kspace)


