"""Multi-coil k-space readers and writers: fastMRI HDF5, the SNU FastMRI challenge layout and a
slice index with an on-disk metadata cache (raw `.mat` / `.npy` / BART files: rawfiles.py).

Every reader returns per-slice k-space as complex64 `(coils, H, W)`, H = readout rows, W =
phase-encode columns (the columns an undersampling mask selects). Problems in the input raise
`UserError` naming the file, the key and what was expected.

- fastMRI (Zbontar et al. 2018, arXiv:1811.08839): `kspace` `(slices, coils, H, W)`, target
  `reconstruction_rss` `(slices, h, w)`, an ISMRMRD XML header giving the crop (`recon_size`) and
  the never-acquired columns (`padding_left` .. `padding_right`), attributes `max`, `norm`,
  `acquisition`, `patient_id` (test files: `mask`, `acceleration`).
- SNU FastMRI challenge: `{image,kspace}/{brain|knee}_{acc4|acc8}_{n}.h5` (leaderboard:
  `{brain|knee}_test{i}.h5` under an `acc4`/`acc8` folder); targets `image_label` 384 x 384.

Example (runs as is)::

    import numpy as np, tempfile, pathlib
    from podium.tasks.reconstruction.readers import write_fastmri_h5, read_volume_info, read_slice
    path = pathlib.Path(tempfile.mkdtemp()) / "file_brain_AXT1_demo.h5"
    k = (np.random.randn(2, 3, 16, 12) + 1j * np.random.randn(2, 3, 16, 12)).astype(np.complex64)
    write_fastmri_h5(path, k, np.ones((2, 8, 6), np.float32), padding=(2, 10))
    info = read_volume_info(path)            # header and shapes only
    sample = read_slice(path, 1)             # {"kspace": (3, 16, 12) complex64, "target": ...}
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from podium.errors import UserError

log = logging.getLogger(__name__)

__all__ = [
    "ISMRMRD_NAMESPACE", "SNUVolume", "SliceIndex", "VolumeInfo", "close_all", "read_slice",
    "read_snu_info", "read_snu_slice", "read_volume_info", "snu_volume_pairs", "write_fastmri_h5",
]  # fmt: skip

ISMRMRD_NAMESPACE = "http://www.ismrm.org/ISMRMRD"
TARGET_KEYS = ("reconstruction_rss", "reconstruction_esc")  # multi-coil first, then single-coil
SNU_IMAGE_SIZE = (384, 384)
PathLike = str | os.PathLike


# ---- volume metadata ------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class VolumeInfo:
    """What a dataset needs to know about one volume without reading its k-space.

    Acquired columns are `padding_left <= col < padding_right` (fastMRI's convention: the right
    value is an end index, not a count). `target_path` is None when the target lives in `path`
    (fastMRI); SNU volumes keep it in a separate image file.
    """

    path: Path
    num_slices: int
    num_coils: int
    shape: tuple[int, int]
    recon_size: tuple[int, int]
    padding_left: int
    padding_right: int
    acquisition: str | None
    max_value: float | None
    norm: float | None
    has_target: bool
    target_key: str | None
    mask: np.ndarray | None = None
    acceleration: float | None = None
    anatomy: str | None = None
    target_path: Path | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        out["target_path"] = None if self.target_path is None else str(self.target_path)
        out["mask"] = None if self.mask is None else self.mask.astype(int).tolist()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VolumeInfo:
        data = dict(data)
        data["path"] = Path(data["path"])
        data["target_path"] = None if data.get("target_path") is None else Path(data["target_path"])
        data["shape"] = tuple(data["shape"])
        data["recon_size"] = tuple(data["recon_size"])
        data["mask"] = None if data.get("mask") is None else np.asarray(data["mask"], dtype=bool)
        return cls(**data)


def guess_anatomy(name: str, acquisition: str | None = None) -> str | None:
    """Guess "brain" / "knee" from the file name (fastMRI brain and SNU names say it), else from the
    fastMRI acquisition (brain: AXT1*, AXT2, AXFLAIR; knee: CORPD_FBK, CORPDFS_FBK), else None."""
    lowered = name.lower()
    for anatomy in ("brain", "knee"):
        if anatomy in lowered:
            return anatomy
    acq = (acquisition or "").upper()
    if acq.startswith(("AXT1", "AXT2", "AXFLAIR")):
        return "brain"
    if acq.startswith("CORPD"):
        return "knee"
    return None


def _plain(value: Any) -> Any:
    """HDF5 attribute -> plain Python (JSON-friendly) value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _require_complex(array_or_dset: Any, where: str) -> None:
    dtype = array_or_dset.dtype
    if not np.issubdtype(dtype, np.complexfloating):
        raise UserError(f"{where}: expected complex k-space, got {dtype}.")


def _require_finite(array: np.ndarray, where: str) -> None:
    if not np.isfinite(array).all():
        raise UserError(f"{where} holds NaN or Inf values.")


def _column_mask(raw: np.ndarray, width: int, where: str) -> np.ndarray:
    mask = np.asarray(raw).reshape(-1) != 0
    if mask.shape[0] != width:
        raise UserError(
            f"{where}: the mask has {mask.shape[0]} columns but the k-space width W is {width}."
        )
    return mask


# ---- fastMRI HDF5: header ---------------------------------------------------------------------


def _ismrmrd_header(shape: tuple[int, int], recon_size: tuple[int, int], center: int,
                    maximum: int) -> bytes:
    """Minimal ISMRMRD XML with the fields fastMRI reads (x = rows H, y = columns W)."""
    q = lambda tag: f"{{{ISMRMRD_NAMESPACE}}}{tag}"
    root = ET.Element(q("ismrmrdHeader"))
    encoding = ET.SubElement(root, q("encoding"))
    for space, (x, y) in (("encodedSpace", shape), ("reconSpace", recon_size)):
        matrix = ET.SubElement(ET.SubElement(encoding, q(space)), q("matrixSize"))
        for axis, value in (("x", x), ("y", y), ("z", 1)):
            ET.SubElement(matrix, q(axis)).text = str(int(value))
    step1 = ET.SubElement(ET.SubElement(encoding, q("encodingLimits")), q("kspace_encoding_step_1"))
    for tag, value in (("minimum", 0), ("maximum", maximum), ("center", center)):
        ET.SubElement(step1, q(tag)).text = str(int(value))
    ET.SubElement(encoding, q("trajectory")).text = "cartesian"
    return ET.tostring(root, encoding="utf-8", xml_declaration=True,
                       default_namespace=ISMRMRD_NAMESPACE)


def _parse_header(raw: Any, width: int, where: str) -> tuple[tuple[int, int], int, int]:
    """(recon_size, padding_left, padding_right) from the XML, computed as fastMRI does:
    center = kspace_encoding_step_1.center, limit = maximum + 1,
    left = encodedSpace.y // 2 - center, right = left + limit. encodedSpace.y equals the k-space
    width W in the public data; W is used when the header omits it."""
    if isinstance(raw, np.ndarray):
        raw = raw.item() if raw.shape == () else raw.tobytes()
    text = raw.encode() if isinstance(raw, str) else bytes(raw)
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise UserError(f"{where}: ismrmrd_header is not valid XML ({exc}).") from None
    ns = root.tag[1 : root.tag.index("}")] if root.tag.startswith("{") else ""

    def number(*tags: str, default: int | None = None) -> int:
        path = "/".join(f"{{{ns}}}{t}" if ns else t for t in ("encoding", *tags))
        node = root.find(path)
        if node is None or not (node.text or "").strip():
            if default is not None:
                return default
            raise UserError(f"{where}: ismrmrd_header lacks encoding/{'/'.join(tags)}.")
        try:
            return int(float(node.text))
        except ValueError:
            raise UserError(f"{where}: encoding/{'/'.join(tags)} is {node.text!r}, "
                            "expected a number.") from None

    recon = (number("reconSpace", "matrixSize", "x"), number("reconSpace", "matrixSize", "y"))
    encoded_y = number("encodedSpace", "matrixSize", "y", default=width)
    center = number("encodingLimits", "kspace_encoding_step_1", "center")
    limit = number("encodingLimits", "kspace_encoding_step_1", "maximum") + 1
    left = encoded_y // 2 - center
    return recon, left, left + limit


def _info_from_file(f: h5py.File, path: Path) -> VolumeInfo:
    where = str(path)
    if "kspace" not in f:
        raise UserError(f"{where}: no 'kspace' dataset (found: {sorted(f.keys())}); the reconstruction "
                        "task expects fastMRI-style HDF5 with complex 'kspace' (slices, coils, H, W).")
    kspace = f["kspace"]
    _require_complex(kspace, f"{where}, key 'kspace'")
    if kspace.ndim == 3:  # single-coil fastMRI: (slices, H, W)
        num_slices, (H, W), num_coils = kspace.shape[0], kspace.shape[1:], 1
    elif kspace.ndim == 4:
        num_slices, num_coils, H, W = kspace.shape
    else:
        raise UserError(f"{where}, key 'kspace': expected (slices, coils, H, W), "
                        f"got shape {kspace.shape}.")
    target_key = next((k for k in TARGET_KEYS if k in f), None)
    if "ismrmrd_header" in f:
        recon_size, left, right = _parse_header(f["ismrmrd_header"][()], W, where)
    else:  # converted datasets often drop the header: nothing known to be missing
        recon_size = tuple(f[target_key].shape[-2:]) if target_key else (H, W)
        left, right = 0, W
    attrs = f.attrs
    mask = _column_mask(f["mask"][()], W, f"{where}, key 'mask'") if "mask" in f else None
    acquisition = _plain(attrs["acquisition"]) if "acquisition" in attrs else None
    return VolumeInfo(
        path=path, num_slices=int(num_slices), num_coils=int(num_coils), shape=(int(H), int(W)),
        recon_size=(int(recon_size[0]), int(recon_size[1])), padding_left=int(left),
        padding_right=int(right), acquisition=acquisition,
        max_value=float(attrs["max"]) if "max" in attrs else None,
        norm=float(attrs["norm"]) if "norm" in attrs else None,
        has_target=target_key is not None, target_key=target_key, mask=mask,
        acceleration=float(attrs["acceleration"]) if "acceleration" in attrs else None,
        anatomy=guess_anatomy(path.name, acquisition),
    )


def _open_h5(path: Path) -> h5py.File:
    if not path.is_file():
        raise UserError(f"{path} does not exist.")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"{path} is not a readable HDF5 file ({exc}).") from None


def read_volume_info(path: PathLike) -> VolumeInfo:
    """Shapes, header and attributes of a fastMRI file; no k-space or image data is read."""
    path = Path(path)
    with _open_h5(path) as f:
        return _info_from_file(f, path)


# ---- fastMRI HDF5: writing --------------------------------------------------------------------


def write_fastmri_h5(path: PathLike, kspace: np.ndarray, reconstruction_rss: np.ndarray | None,
                     *, recon_size: tuple[int, int] | None = None,
                     padding: tuple[int, int] | None = None, acquisition: str = "AXT1",
                     attrs: dict[str, Any] | None = None,
                     mask: np.ndarray | None = None) -> Path:
    """Write a fastMRI-layout file atomically (temporary file in the same folder, then rename).

    `recon_size` (h, w) defaults to the target's shape (else (H, W)); `padding` (left, right)
    are the first and one-past-last acquired columns (None: all columns acquired). `attrs` are
    extra HDF5 attributes (e.g. `acceleration`, `patient_id`).
    """
    path = Path(path)
    kspace = np.asarray(kspace)
    if kspace.ndim != 4 or not np.iscomplexobj(kspace):
        raise ValueError(f"kspace must be complex (slices, coils, H, W), got {kspace.dtype} "
                         f"{kspace.shape}")
    S, _, H, W = kspace.shape
    if reconstruction_rss is not None:
        reconstruction_rss = np.asarray(reconstruction_rss, dtype=np.float32)
        if reconstruction_rss.ndim != 3 or reconstruction_rss.shape[0] != S:
            raise ValueError(f"reconstruction_rss must be ({S}, h, w), got "
                             f"{reconstruction_rss.shape}")
    if recon_size is None:
        recon_size = reconstruction_rss.shape[1:] if reconstruction_rss is not None else (H, W)
    left, right = (0, W) if padding is None else (int(padding[0]), int(padding[1]))
    if not 0 <= left < right <= W:
        raise ValueError(f"padding must satisfy 0 <= left < right <= W={W}, got {padding}")
    if mask is not None and np.asarray(mask).reshape(-1).shape[0] != W:
        raise ValueError(f"mask must have W={W} entries, got {np.asarray(mask).shape}")
    # Inverse of the fastMRI parsing: left = W // 2 - center, right = left + maximum + 1.
    header = _ismrmrd_header((H, W), tuple(recon_size), center=W // 2 - left,
                             maximum=right - left - 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp_name, "w") as f:
            f.create_dataset("kspace", data=kspace.astype(np.complex64, copy=False))
            f.create_dataset("ismrmrd_header", data=np.bytes_(header))
            if reconstruction_rss is not None:
                f.create_dataset("reconstruction_rss", data=reconstruction_rss)
                f.attrs["max"] = float(reconstruction_rss.max())
                f.attrs["norm"] = float(np.linalg.norm(reconstruction_rss.astype(np.float64)))
            if mask is not None:
                f.create_dataset("mask", data=np.asarray(mask).reshape(-1))
            f.attrs["acquisition"] = acquisition
            f.attrs["patient_id"] = path.stem
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
        _forget(path)  # a cached handle would keep serving the replaced file's data
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


# ---- per-process handle cache -----------------------------------------------------------------
# Reopening HDF5 files per slice leaks memory with pip h5py on HDF5 >= 1.12.1 (reference.md), so
# each process keeps its handles. A DataLoader worker forked from a process that already holds
# handles must not share them (HDF5 state is not fork-safe): the cache remembers its pid and
# starts over in a new process.

MAX_OPEN_FILES = 64
_handles: OrderedDict[str, h5py.File] = OrderedDict()
_infos: dict[str, VolumeInfo] = {}
_owner_pid = os.getpid()


def _handle(path: Path) -> h5py.File:
    global _owner_pid
    if os.getpid() != _owner_pid:
        _handles.clear()  # the parent's handles: dropped, never used or closed here
        _infos.clear()
        _owner_pid = os.getpid()
    key = str(path.absolute())
    f = _handles.get(key)
    if f is None or not f.id.valid:
        f = _open_h5(path)
        _handles[key] = f
        while len(_handles) > MAX_OPEN_FILES:
            _handles.popitem(last=False)[1].close()
    _handles.move_to_end(key)
    return f


def _forget(path: Path) -> None:
    key = str(path.absolute())
    _infos.pop(key, None)
    f = _handles.pop(key, None)
    if f is not None and os.getpid() == _owner_pid and f.id.valid:
        f.close()


def close_all() -> None:
    """Close every cached HDF5 handle of this process (e.g. at the end of an evaluation)."""
    for path in list(_handles):
        _forget(Path(path))
    _infos.clear()


def _read_slice_of(f: h5py.File, key: str, index: int, where: str) -> np.ndarray:
    n = f[key].shape[0]
    if not -n <= index < n:
        raise IndexError(f"{where}: slice {index} out of range for '{key}' with {n} slices.")
    return f[key][index % n]


def read_slice(path: PathLike, index: int) -> dict[str, Any]:
    """One slice of a fastMRI file: `kspace` complex64 (C, H, W), `target` float32 (h, w) or
    None, `mask` bool (W,) or None, `attrs` (file attributes plus `recon_size`, `padding_left`,
    `padding_right`). NaN/Inf in the slice raise UserError."""
    path = Path(path)
    f = _handle(path)
    key = str(path.absolute())
    info = _infos.get(key) or _infos.setdefault(key, _info_from_file(f, path))
    where = f"{path}, slice {index}"
    kspace = _read_slice_of(f, "kspace", index, where).astype(np.complex64, copy=False)
    if kspace.ndim == 2:
        kspace = kspace[None]
    _require_finite(kspace, f"{path}, key 'kspace', slice {index}")
    target = None
    if info.target_key is not None:
        target = _read_slice_of(f, info.target_key, index, where).astype(np.float32, copy=False)
        _require_finite(target, f"{path}, key '{info.target_key}', slice {index}")
    attrs = {k: _plain(v) for k, v in f.attrs.items()}
    attrs.update(recon_size=info.recon_size, padding_left=info.padding_left,
                 padding_right=info.padding_right)
    mask = None if info.mask is None else info.mask.copy()
    return {"kspace": kspace, "target": target, "mask": mask, "attrs": attrs}


# ---- SNU FastMRI challenge layout -------------------------------------------------------------

_SNU_NAME_ACC = re.compile(r"(?:^|_)acc(\d+)(?:_|\.|$)", re.IGNORECASE)
_SNU_FOLDER_ACC = re.compile(r"acc(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class SNUVolume:
    """A k-space file and its image file (None when the split ships no images)."""

    kspace_path: Path
    image_path: Path | None
    name: str
    anatomy: str | None
    acceleration: int | None


def _snu_acceleration(name: str, root: Path) -> int | None:
    # Train/val names carry it (brain_acc4_3.h5); leaderboard files sit under an acc4/acc8 folder.
    match = _SNU_NAME_ACC.search(name)
    if match:
        return int(match.group(1))
    for part in reversed(root.absolute().parts):
        match = _SNU_FOLDER_ACC.fullmatch(part)
        if match:
            return int(match.group(1))
    return None


def snu_volume_pairs(root: PathLike, require_images: bool = True) -> list[SNUVolume]:
    """Pair `root/kspace/*.h5` with `root/image/*.h5` by file name, sorted by name."""
    root = Path(root)
    kspace_dir, image_dir = root / "kspace", root / "image"
    if not kspace_dir.is_dir():
        raise UserError(f"{root}: no 'kspace' folder (SNU layout: {{image,kspace}}/*.h5).")
    if require_images and not image_dir.is_dir():
        raise UserError(f"{root}: no 'image' folder (SNU layout: {{image,kspace}}/*.h5).")
    kspace_files = {p.name: p for p in kspace_dir.glob("*.h5")}
    image_files = {p.name: p for p in image_dir.glob("*.h5")} if image_dir.is_dir() else {}
    if not kspace_files:
        raise UserError(f"{kspace_dir}: no .h5 files.")
    missing_images = sorted(set(kspace_files) - set(image_files))
    if require_images and missing_images:
        raise UserError(f"{kspace_files[missing_images[0]]} has no image file "
                        f"{image_dir / missing_images[0]}.")
    missing_kspace = sorted(set(image_files) - set(kspace_files))
    if missing_kspace:
        raise UserError(f"{image_files[missing_kspace[0]]} has no k-space file "
                        f"{kspace_dir / missing_kspace[0]}.")
    return [
        SNUVolume(kspace_path=kspace_files[name], image_path=image_files.get(name),
                  name=Path(name).stem, anatomy=guess_anatomy(name),
                  acceleration=_snu_acceleration(name, root))
        for name in sorted(kspace_files)
    ]


def read_snu_info(kspace_path: PathLike, image_path: PathLike | None = None) -> VolumeInfo:
    """VolumeInfo of an SNU pair from shapes and attributes only (target key `image_label`)."""
    kspace_path = Path(kspace_path)
    where = str(kspace_path)
    with _open_h5(kspace_path) as f:
        if "kspace" not in f:
            raise UserError(f"{where}: no 'kspace' dataset (found: {sorted(f.keys())}).")
        _require_complex(f["kspace"], f"{where}, key 'kspace'")
        if f["kspace"].ndim != 4:
            raise UserError(f"{where}, key 'kspace': expected (slices, coils, H, W), "
                            f"got shape {f['kspace'].shape}.")
        num_slices, num_coils, H, W = f["kspace"].shape
        if "mask" not in f:
            raise UserError(f"{where}: no 'mask' dataset (SNU k-space files carry one).")
        mask = _column_mask(f["mask"][()], W, f"{where}, key 'mask'")
    recon_size, max_value, has_target = SNU_IMAGE_SIZE, None, False
    if image_path is not None:
        with _open_h5(Path(image_path)) as g:
            has_target = "image_label" in g
            if has_target:
                recon_size = tuple(int(n) for n in g["image_label"].shape[-2:])
            max_value = float(g.attrs["max"]) if "max" in g.attrs else None
    return VolumeInfo(
        path=kspace_path, num_slices=int(num_slices), num_coils=int(num_coils),
        shape=(int(H), int(W)), recon_size=recon_size, padding_left=0, padding_right=int(W),
        acquisition=None, max_value=max_value, norm=None, has_target=has_target,
        target_key="image_label" if has_target else None, mask=mask,
        acceleration=_snu_acceleration(kspace_path.name, kspace_path.parent.parent),
        anatomy=guess_anatomy(kspace_path.name),
        target_path=None if image_path is None else Path(image_path),
    )


def read_snu_slice(kspace_path: PathLike, image_path: PathLike | None,
                   index: int) -> dict[str, Any]:
    """`kspace` complex64 (C, H, W), `mask` bool (W,), `target` (`image_label`, float32
    384 x 384), `input` (`image_input`) and `max_value` (image attr `max`); the last three None
    without an image file."""
    kspace_path = Path(kspace_path)
    f = _handle(kspace_path)
    where = str(kspace_path)
    if "kspace" not in f:
        raise UserError(f"{where}: no 'kspace' dataset (found: {sorted(f.keys())}).")
    _require_complex(f["kspace"], f"{where}, key 'kspace'")
    kspace = _read_slice_of(f, "kspace", index, where).astype(np.complex64, copy=False)
    _require_finite(kspace, f"{where}, key 'kspace', slice {index}")
    if "mask" not in f:
        raise UserError(f"{where}: no 'mask' dataset (SNU k-space files carry one).")
    mask = _column_mask(f["mask"][()], kspace.shape[-1], f"{where}, key 'mask'")
    out = {"kspace": kspace, "mask": mask, "target": None, "input": None, "max_value": None}
    if image_path is not None:
        g = _handle(Path(image_path))
        for key, name in (("image_label", "target"), ("image_input", "input")):
            if key in g:
                out[name] = _read_slice_of(g, key, index, str(image_path)).astype(np.float32)
        out["max_value"] = float(g.attrs["max"]) if "max" in g.attrs else None
    return out


# ---- slice index with a metadata cache --------------------------------------------------------

CACHE_FILE = "volume_info.json"
CACHE_VERSION = 1
Volume = PathLike | SNUVolume


def _stamp(path: Path) -> list:
    if not path.is_file():
        raise UserError(f"{path} does not exist.")
    st = path.stat()
    return [str(path.absolute()), st.st_size, st.st_mtime_ns]


def _load_cache(cache_dir: Path | None) -> dict[str, Any]:
    if cache_dir is None or not (cache_dir / CACHE_FILE).is_file():
        return {}
    try:
        data = json.loads((cache_dir / CACHE_FILE).read_text())
        return data["entries"] if data.get("version") == CACHE_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError):  # a damaged cache only costs time
        log.warning("ignoring unreadable metadata cache %s", cache_dir / CACHE_FILE)
        return {}


def _save_cache(cache_dir: Path, entries: dict[str, Any]) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".volume_info.", suffix=".tmp", dir=cache_dir)
        with os.fdopen(fd, "w") as out:
            json.dump({"version": CACHE_VERSION, "entries": entries}, out)
        os.replace(tmp, cache_dir / CACHE_FILE)
    except OSError as exc:
        log.warning("could not write the metadata cache in %s (%s)", cache_dir, exc)


@dataclass
class SliceIndex:
    """Every (volume, slice) pair of a dataset; `index[i]` -> (VolumeInfo, slice number).

    With `cache_dir`, each VolumeInfo is kept in `cache_dir/volume_info.json`, keyed by the
    absolute path and checked against file size and mtime (ns), so reopening a large dataset
    opens only new or changed volumes.
    """

    infos: list[VolumeInfo]
    entries: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.entries:
            self.entries = [(v, s) for v, info in enumerate(self.infos)
                            for s in range(info.num_slices)]

    @classmethod
    def build(cls, paths: Iterable[Volume], cache_dir: PathLike | None = None) -> SliceIndex:
        """`paths`: fastMRI files, or `SNUVolume`s (from `snu_volume_pairs`)."""
        cache_path = None if cache_dir is None else Path(cache_dir)
        cached = _load_cache(cache_path)
        infos, changed = [], False
        for item in paths:
            files = ([Path(item)] if not isinstance(item, SNUVolume)
                     else [item.kspace_path] + ([item.image_path] if item.image_path else []))
            stamps = [_stamp(p) for p in files]
            key = ("snu:" if isinstance(item, SNUVolume) else "") + stamps[0][0]
            entry = cached.get(key)
            if entry is not None and entry.get("stamps") == stamps:
                # the same file may be named by another relative path: keep the caller's names
                info = replace(VolumeInfo.from_json(entry["info"]), path=files[0],
                               target_path=files[1] if len(files) > 1 else None)
            else:
                info = (read_snu_info(item.kspace_path, item.image_path)
                        if isinstance(item, SNUVolume) else read_volume_info(files[0]))
                cached[key] = {"stamps": stamps, "info": info.to_json()}
                changed = True
            infos.append(info)
        if cache_path is not None and changed:
            _save_cache(cache_path, cached)
        return cls(infos)

    @property
    def volumes(self) -> list[VolumeInfo]:
        return self.infos

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[VolumeInfo, int]:
        volume, slice_index = self.entries[i]
        return self.infos[volume], slice_index
