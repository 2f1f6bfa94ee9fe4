"""PreprocessCache: hits and misses, invalidation, corrupt entries, concurrent writers."""

import multiprocessing as mp
import os

import numpy as np
import pytest

from podium.tasks.landmarks.cache import PreprocessCache, resolve_cache_dir


class Maker:
    """A `make` callable that counts its calls."""

    def __init__(self, value=7, shape=(5, 4)):
        self.calls = 0
        self.value = value
        self.shape = shape

    def __call__(self):
        self.calls += 1
        return np.full(self.shape, self.value, dtype=np.uint8)


@pytest.fixture
def source(tmp_path):
    p = tmp_path / "img.bin"
    p.write_bytes(b"original bytes")
    return p


def entries(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_disabled_cache_always_makes(source):
    cache = PreprocessCache(None)
    make = Maker()
    for _ in range(3):
        assert cache.get_or_create(source, {"a": 1}, make).shape == (5, 4)
    assert make.calls == 3 and cache.hits == 0 and cache.misses == 3
    assert not cache.enabled


def test_hits_and_misses(tmp_path, source):
    cache = PreprocessCache(tmp_path / "cache")
    make = Maker()
    first = cache.get_or_create(source, {"out": [4, 5]}, make)
    second = cache.get_or_create(source, {"out": [4, 5]}, make)
    np.testing.assert_array_equal(first, second)
    assert second.dtype == np.uint8 and not isinstance(second, np.memmap)
    assert (make.calls, cache.hits, cache.misses) == (1, 1, 1)
    # a fresh instance (another worker) finds the same entry
    other = PreprocessCache(tmp_path / "cache")
    other.get_or_create(source, {"out": [4, 5]}, make)
    assert (make.calls, other.hits) == (1, 1)
    [entry] = entries(tmp_path / "cache")
    assert entry.suffix == ".npy" and entry == cache.path_for(source, {"out": [4, 5]})


def test_param_order_does_not_matter_but_values_do(tmp_path, source):
    cache = PreprocessCache(tmp_path / "cache")
    make = Maker()
    cache.get_or_create(source, {"a": 1, "b": 2}, make)
    cache.get_or_create(source, {"b": 2, "a": 1}, make)
    assert make.calls == 1
    cache.get_or_create(source, {"a": 1, "b": 3}, make)
    assert make.calls == 2 and cache.misses == 2


def test_touching_or_editing_the_source_invalidates(tmp_path, source):
    cache = PreprocessCache(tmp_path / "cache")
    make = Maker()
    cache.get_or_create(source, {}, make)
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touch: mtime only
    cache.get_or_create(source, {}, make)
    assert make.calls == 2
    mtime = source.stat().st_mtime_ns
    source.write_bytes(b"edited, longer bytes")  # size changes (mtime restored: size alone counts)
    os.utime(source, ns=(mtime, mtime))
    cache.get_or_create(source, {}, make)
    assert make.calls == 3
    cache.get_or_create(source, {}, make)
    assert make.calls == 3


def test_same_content_other_path_is_another_entry(tmp_path, source):
    copy = tmp_path / "copy.bin"
    copy.write_bytes(source.read_bytes())
    os.utime(copy, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns))
    cache = PreprocessCache(tmp_path / "cache")
    make = Maker()
    cache.get_or_create(source, {}, make)
    cache.get_or_create(copy, {}, make)
    assert make.calls == 2


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_corrupt_entry_is_recomputed(tmp_path, source, damage):
    cache = PreprocessCache(tmp_path / "cache")
    make = Maker(shape=(64, 64))
    cache.get_or_create(source, {}, make)
    entry = cache.path_for(source, {})
    data = entry.read_bytes()
    entry.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "garbage": b"not npy" * 20}[damage])
    out = cache.get_or_create(source, {}, make)
    assert make.calls == 2 and out.shape == (64, 64)
    np.testing.assert_array_equal(np.load(entry), out)  # rewritten, valid again
    assert cache.get_or_create(source, {}, make).shape == (64, 64) and make.calls == 2


def test_unwritable_root_degrades_to_no_cache(tmp_path, source, caplog):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    cache = PreprocessCache(blocker)
    make = Maker()
    for _ in range(2):
        assert cache.get_or_create(source, {}, make).shape == (5, 4)
    assert make.calls == 2
    assert sum("cannot write" in r.getMessage() for r in caplog.records) == 1


def test_missing_source_calls_make(tmp_path):
    cache = PreprocessCache(tmp_path / "cache")

    def make():
        raise FileNotFoundError("the user-facing error comes from make()")

    with pytest.raises(FileNotFoundError, match="user-facing"):
        cache.get_or_create(tmp_path / "absent.png", {}, make)


def test_resolve_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert resolve_cache_dir(None) == tmp_path / "podium" / "landmarks"
    assert resolve_cache_dir("none") is None and resolve_cache_dir("") is None
    assert resolve_cache_dir(str(tmp_path / "c")) == tmp_path / "c"


# ---- concurrency ----------------------------------------------------------------------------


def _writer(root, source, barrier, n_keys, worker):
    cache = PreprocessCache(root)
    barrier.wait()
    for k in range(n_keys):
        # Both processes miss every key at about the same time and both write it.
        cache.get_or_create(source, {"k": k}, lambda k=k: np.full((300, 200), k, dtype=np.uint8))


def test_concurrent_writers_leave_valid_files(tmp_path, source):
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    root = tmp_path / "cache"
    barrier = ctx.Barrier(2)
    n_keys = 25
    procs = [ctx.Process(target=_writer, args=(root, source, barrier, n_keys, i)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    files = entries(root)
    assert len(files) == n_keys  # no temporary files left behind
    cache = PreprocessCache(root)
    for k in range(n_keys):
        out = cache.get_or_create(source, {"k": k}, lambda: pytest.fail("should be cached"))
        assert out.shape == (300, 200) and (out == k).all()
    assert cache.hits == n_keys
