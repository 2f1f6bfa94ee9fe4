"""On-disk cache of preprocessed (decoded + letterboxed) images, shared by DataLoader workers.

Decoding a 1935 x 2400 cephalogram (ISBI 2015 challenge, Wang et al.) and resizing it costs far
more than a training step of a small heatmap network: without a cache the GPU waits on the
loader most of the time (17-24 % busy measured by users). The letterboxed uint8 array is small
(256 x 208 = 53 kB), so it is computed once per (file, preprocessing) and read back as `.npy`.

    cache = PreprocessCache(Path("~/.cache/podium/landmarks").expanduser())
    arr = cache.get_or_create(path, {"out": [256, 208], "channels": 1}, make=lambda: ...)

Key: sha256 of the absolute source path, its mtime (ns) and size, and
`json.dumps(params, sort_keys=True)`; editing or touching the file, or changing any parameter,
selects a new entry (old ones are simply never read again). Entries are written to a temporary
file in the same folder and moved into place with `os.replace` (atomic on POSIX and Windows), so
several worker processes can fill the same folder: a reader sees a complete file or none. An
unreadable entry (truncated by a crash or a full disk) is recomputed and rewritten, never fatal;
a folder that cannot be written to only costs speed (one warning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["PreprocessCache", "default_cache_dir", "resolve_cache_dir"]


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/podium/landmarks`, else `~/.cache/podium/landmarks`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "podium" / "landmarks"


def resolve_cache_dir(value: Optional[str]) -> Optional[Path]:
    """The `cache_dir` config value as a folder: None -> the default, "none"/"" -> disabled."""
    if value is None:
        return default_cache_dir()
    text = str(value).strip()
    if text.lower() in ("", "none", "null", "off", "false"):
        return None
    return Path(text).expanduser()


class PreprocessCache:
    """`.npy` files under `root` keyed by source file identity and preprocessing parameters.

    `root=None` disables caching: `get_or_create` then always calls `make`. `hits` and `misses`
    count this instance's lookups (per process: each DataLoader worker has its own copy).
    """

    def __init__(self, root: Optional[Path | str]):
        self.root = Path(root).expanduser() if root is not None else None
        self.hits = 0
        self.misses = 0
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def __repr__(self) -> str:
        return f"PreprocessCache({str(self.root) if self.root else None!r})"

    # ---- keys ---------------------------------------------------------------------------

    @staticmethod
    def key(source: Path | str, params: dict[str, Any]) -> str:
        """sha256 hex of (absolute path, mtime_ns, size, sorted-JSON params)."""
        path = Path(source).expanduser().absolute()
        st = path.stat()
        blob = json.dumps(
            [str(path), st.st_mtime_ns, st.st_size, json.dumps(params, sort_keys=True)],
            separators=(",", ":"),
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def path_for(self, source: Path | str, params: dict[str, Any]) -> Optional[Path]:
        """Where the entry for (source, params) lives (None when disabled)."""
        if self.root is None:
            return None
        k = self.key(source, params)
        return self.root / k[:2] / f"{k}.npy"

    # ---- lookup -------------------------------------------------------------------------

    def get_or_create(
        self, source: Path | str, params: dict[str, Any], make: Callable[[], np.ndarray]
    ) -> np.ndarray:
        """The cached array for (source, params), or `make()`'s result, stored for next time."""
        if self.root is None:
            self.misses += 1
            return make()
        try:
            entry = self.path_for(source, params)
        except OSError:
            # The source cannot be stat'ed (missing?): `make` raises the user-facing error.
            self.misses += 1
            return make()
        assert entry is not None
        if entry.is_file():
            try:
                arr = np.load(entry, mmap_mode=None, allow_pickle=False)
                self.hits += 1
                return arr
            except Exception as e:  # noqa: BLE001 - truncated/corrupt entry: recompute it
                log.warning("preprocess cache: unreadable entry %s (%s); recomputing it", entry, e)
        self.misses += 1
        arr = np.asarray(make())
        self._store(entry, arr)
        return arr

    def _store(self, entry: Path, arr: np.ndarray) -> None:
        tmp_name = None
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.stem[:16]}.", suffix=".tmp", dir=entry.parent)
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
                f.flush()
            os.replace(tmp_name, entry)  # atomic: readers see the old file, the new one, or none
            tmp_name = None
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning(
                    "preprocess cache: cannot write to %s (%s); continuing without caching. Set "
                    "data.cache_dir to a writable folder, or 'none' to silence this.",
                    self.root, e,
                )
        finally:
            if tmp_name is not None:
                try:
                    os.unlink(tmp_name)
                except OSError:
                    pass
