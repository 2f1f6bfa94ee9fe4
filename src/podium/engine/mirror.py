"""Mirror a run folder off the machine, and resume from the mirror when the machine is gone.

`run.mirror=URI` (a local folder or any fsspec URL: file://, memory://, s3:// with s3fs, gs://
with gcsfs, ...) copies every checkpoint, history.csv, metrics.json, config.yaml, the run card
and the plots to `URI/<run folder name>/` as soon as they are written, so a rented box that dies
(or is wiped for using too much disk) loses at most the work since the last checkpoint.

    podium train experiment=digits run.dir=runs/a run.mirror=/mnt/backup      # -> /mnt/backup/a
    podium train resume=/mnt/backup/a        # runs/a is gone: fetched back, then resumed
    podium train resume=runs/a               # the same: runs/.podium-mirrors.json remembers the mirror

How, and why:
- One background thread with a queue copies the files; the training loop only appends a path
  (`submit`), so a slow or unreachable mirror never stalls training. A path queued twice is
  copied once (last.pt is rewritten every epoch). A failure prints a warning and training goes
  on; the file is copied again the next time it is written and once more at the end of the run,
  when the queue is drained with a bounded wait (`run.mirror_timeout_s`) and the outcome printed.
- Each file is streamed in chunks to a temporary name in the same far folder, then moved over
  the final name (`fs.mv`: a rename on a local or mounted disk, a copy then delete on object
  stores, where a completed PUT is itself atomic): the far side never holds a torn checkpoint.
- A checkpoint's far SHA-256 sidecar is computed from the bytes that were sent, not copied from
  the local sidecar, because last.pt may be replaced on the local disk between the two copies.
  As in podium.engine.checkpoint.atomic_save, the sidecar lists the new and the previous hash
  while the checkpoint is moved, so a crash between the two leaves a pair that verifies.
- `podium-mirror.json` in the far folder says where the run lived; the run folder's parent
  keeps `.podium-mirrors.json` ({run name: far folder}) so `resume=RUN_DIR` finds the mirror
  after the run folder itself was deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections import deque
from pathlib import Path

from podium.errors import UserError

MARKER = "podium-mirror.json"  # in the far run folder
INDEX = ".podium-mirrors.json"  # beside local run folders: {run name: far run folder}
PART = ".part"  # suffix of far temporary names
CHUNK = 8 << 20  # bytes per read/write: files larger than memory are streamed
SIDECAR = ".sha256"  # podium.engine.checkpoint.HASH_SUFFIX
FORGET = "\0rm:"  # queue entries that remove a far file (no file name starts with NUL)


def open_target(uri: str, key: str = "run.mirror"):
    """(fsspec filesystem, path without protocol) for `uri`; UserError naming `key` when the
    protocol is unknown or its package is missing."""
    from fsspec.core import url_to_fs

    try:
        fs, path = url_to_fs(str(uri))
    except ValueError as err:  # "Protocol not known: foo"
        raise UserError(f"{key}={uri}: {err}. Give a local folder or an fsspec URL such as file:///mnt/backup, "
                        "s3://bucket/runs (needs s3fs) or gs://bucket/runs (needs gcsfs).") from None
    except ImportError as err:
        raise UserError(f"{key}={uri}: this protocol needs a package that is not installed ({err}).") from None
    return fs, path.rstrip("/") or "/"


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and (name.endswith(PART) or name.endswith(".tmp"))


class Mirror:
    """Copies files of `run_dir` to `{uri}/{run_dir.name}/` from one background thread."""

    def __init__(self, uri: str, run_dir: Path, console=None, timeout_s: float = 300.0):
        self.uri, self.run_dir, self.console, self.timeout_s = str(uri), Path(run_dir), console, timeout_s
        self.fs, base = open_target(uri)
        self.root = f"{base.rstrip('/')}/{self.run_dir.name}"
        self.far = f"{self.uri.rstrip('/')}/{self.run_dir.name}"  # as the user writes it, for messages
        self.copied, self.failures, self._warned = 0, {}, 0
        self._sent: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) last copied
        self._hashes: dict[str, str] = {}  # relative path -> SHA-256 last sent (for sidecars)
        self._queue: deque[str] = deque()
        self._cond = threading.Condition()
        self._busy = self._closing = False
        self._thread = threading.Thread(target=self._work, name="podium-mirror", daemon=True)
        self._queue.append("")  # "" = write the marker first
        self._thread.start()

    # ------------------------------------------------------------------ producer side
    def submit(self, *paths: Path) -> None:
        """Queue files (or every file under folders) of the run folder; returns at once."""
        rels = []
        for path in paths:
            path = Path(path)
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for f in files:
                try:
                    rel = f.relative_to(self.run_dir).as_posix()
                except ValueError:
                    continue  # outside the run folder (e.g. an eval --out elsewhere)
                if not _is_temporary(f.name) and not f.name.endswith(SIDECAR):
                    rels.append(rel)
        with self._cond:
            for rel in rels:
                if rel not in self._queue:
                    self._queue.append(rel)
            self._cond.notify_all()

    def forget(self, *paths: Path) -> None:
        """Queue the removal of files pruned by the retention policy from the far side too."""
        with self._cond:
            for path in paths:
                rel = Path(path).relative_to(self.run_dir).as_posix()
                if rel in self._queue:
                    self._queue.remove(rel)
                self._queue.append(FORGET + rel)
            self._cond.notify_all()

    def submit_tree(self) -> None:
        """Queue the whole run folder; files already sent unchanged are skipped by the worker."""
        self.submit(self.run_dir)

    def close(self, timeout_s: float | None = None) -> dict:
        """Drain the queue, waiting at most `timeout_s`; print and return the outcome."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while (self._queue or self._busy) and time.monotonic() < deadline:
                self._cond.wait(max(0.01, deadline - time.monotonic()))
            pending = len(self._queue) + int(self._busy)
            self._queue.clear()
            failures = dict(self.failures)
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        outcome = {"far": self.far, "copied": self.copied, "failed": failures, "pending": pending}
        if self.console is not None:
            if not failures and not pending:
                self.console.print(f"mirror: {self.far} is up to date ({self.copied} file copies sent)", highlight=False)
            else:
                failed = "; ".join(f"{k}: {v}" for k, v in list(failures.items())[:3])
                self.console.print(
                    f"[yellow]mirror: {self.copied} file copies sent to {self.far}, {len(failures)} failed"
                    f"{f' ({failed})' if failed else ''}, {pending} not sent within run.mirror_timeout_s="
                    f"{timeout_s:g}. The local run folder {self.run_dir} is complete.", highlight=False)
        return outcome

    # ------------------------------------------------------------------ worker side
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                rel = self._queue.popleft()
                self._busy = True
            error = None
            try:
                if rel == "":
                    self._write_marker()
                elif rel.startswith(FORGET):
                    self._remove_far(rel[len(FORGET):])
                else:
                    self._copy(rel)
            except Exception as err:  # a mirror problem must never stop training
                error = err
                self._warn(rel or MARKER, err)
            finally:
                with self._cond:
                    if error is None:
                        self.failures.pop(rel or MARKER, None)
                    else:
                        self.failures[rel or MARKER] = f"{type(error).__name__}: {error}"
                    self._busy = False
                    self._cond.notify_all()

    def _remove_far(self, rel: str) -> None:
        for path in (f"{self.root}/{rel}", f"{self.root}/{rel}{SIDECAR}"):
            self._remove_quietly(path)
        self._sent.pop(rel, None)
        self._hashes.pop(rel, None)

    def _warn(self, rel: str, err: Exception) -> None:
        self._warned += 1
        if self.console is not None and self._warned <= 3:  # a dead mirror must not flood the log
            more = " (further mirror failures are summed up at the end)" if self._warned == 3 else ""
            self.console.print(f"[yellow]mirror: could not copy {rel} to {self.far} ({type(err).__name__}: "
                               f"{err}); training goes on{more}.", highlight=False)

    def _write_marker(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        info = {"run_dir": str(self.run_dir.resolve()), "run_name": self.run_dir.name,
                "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._put_bytes(f"{self.root}/{MARKER}", json.dumps(info, indent=2).encode())

    def _temporary(self, remote: str) -> str:
        folder, name = remote.rsplit("/", 1)
        return f"{folder}/.{name}.{uuid.uuid4().hex[:8]}{PART}"

    def _put_bytes(self, remote: str, data: bytes) -> None:
        tmp = self._temporary(remote)
        try:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, remote)
        except BaseException:
            self._remove_quietly(tmp)
            raise

    def _remove_quietly(self, path: str) -> None:
        try:
            if self.fs.exists(path):
                self.fs.rm(path)
        except Exception:
            pass

    def _copy(self, rel: str) -> None:
        local = self.run_dir / rel
        try:
            src = open(local, "rb")
        except FileNotFoundError:
            return  # pruned or replaced since it was queued; a newer submit follows
        with src:
            st = os.fstat(src.fileno())
            if self._sent.get(rel) == (st.st_size, st.st_mtime_ns):
                return
            remote = f"{self.root}/{rel}"
            self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
            tmp = self._temporary(remote)
            digest = hashlib.sha256()
            try:
                # the open handle keeps reading the file we opened even if an atomic save renames
                # a newer one over its name meanwhile
                with self.fs.open(tmp, "wb") as dst:
                    for block in iter(lambda: src.read(CHUNK), b""):
                        digest.update(block)
                        dst.write(block)
                checksum = local.with_name(local.name + SIDECAR).is_file()
                new = digest.hexdigest()
                if checksum:
                    old = self._hashes.get(rel) or self._far_hash(remote)
                    lines = [f"{new}  {local.name}"] + ([f"{old}  {local.name}"] if old and old != new else [])
                    self._put_bytes(remote + SIDECAR, ("\n".join(lines) + "\n").encode())
                self.fs.mv(tmp, remote)
            except BaseException:
                self._remove_quietly(tmp)
                raise
            if checksum:
                self._put_bytes(remote + SIDECAR, f"{new}  {local.name}\n".encode())
                self._hashes[rel] = new
            self._sent[rel] = (st.st_size, st.st_mtime_ns)
            self.copied += 1

    def _far_hash(self, remote: str) -> str | None:
        try:
            return self.fs.cat_file(remote + SIDECAR).decode().split()[0]
        except Exception:
            return None


# ---------------------------------------------------------------------- the run's side
def start(cfg, run_dir: Path, console=None) -> Mirror | None:
    """The Mirror of `cfg.run.mirror` for `run_dir` (None when unset), recorded beside the run."""
    from omegaconf import OmegaConf

    uri = OmegaConf.select(cfg, "run.mirror", default=None)
    if not uri:
        return None
    mirror = Mirror(uri, run_dir, console, float(OmegaConf.select(cfg, "run.mirror_timeout_s", default=300.0)))
    remember(run_dir, mirror.far)
    if console is not None:
        console.print(f"mirror: {mirror.far}", highlight=False)
    return mirror


def remember(run_dir: Path, far: str) -> None:
    """Record `far` in the run folder's parent, so `resume=RUN_DIR` finds it once RUN_DIR is gone."""
    index = Path(run_dir).parent / INDEX
    try:
        known = json.loads(index.read_text()) if index.is_file() else {}
    except ValueError:
        known = {}
    known[Path(run_dir).name] = far
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_name(f"{INDEX}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=2))
        tmp.replace(index)
    except OSError:
        pass  # a convenience: resume=URI still works


def recorded_mirror(run_dir: Path) -> str | None:
    index = Path(run_dir).parent / INDEX
    try:
        return json.loads(index.read_text()).get(Path(run_dir).name) if index.is_file() else None
    except ValueError:
        return None


def resolve_resume(spec: str, console=None) -> Path:
    """The local run folder that `resume=SPEC` continues. SPEC is a local run folder (returned
    as is); a run folder that is gone but whose mirror is recorded beside it; or a mirror (a URL,
    or a local folder holding podium-mirror.json), fetched into the run's folder when that is
    missing."""
    local = Path(spec)
    if "://" not in spec and not (local / MARKER).is_file():
        if (local / "config.yaml").is_file():
            return local
        far = recorded_mirror(local)
        if far is None:
            return local  # existing_run_dir says what is wrong
        if console is not None:
            console.print(f"{local} is gone; its mirror {far} is recorded in {local.parent / INDEX}", highlight=False)
        return fetch(far, local, console)
    fs, root = open_target(spec, "resume")
    try:
        info = json.loads(fs.cat_file(f"{root}/{MARKER}"))
    except FileNotFoundError:
        runs = [p.rsplit("/", 1)[-1] for p in _subfolders(fs, root) if fs.exists(f"{p}/{MARKER}")]
        hint = f" It holds the mirrors of: {', '.join(runs)}; give one of them, e.g. resume={spec.rstrip('/')}/{runs[0]}." if runs else ""
        raise UserError(f"resume={spec} is not a podium run mirror (no {MARKER} inside).{hint}") from None
    target = Path(info.get("run_dir") or info["run_name"])
    if (target / "config.yaml").is_file():
        if console is not None:
            console.print(f"{target} (the run of this mirror) exists on this machine; resuming it. "
                          f"Move it away to resume from the mirror instead.", highlight=False)
        return target
    return fetch(spec, target, console)


def _subfolders(fs, root: str) -> list[str]:
    try:
        return [e["name"] for e in fs.ls(root, detail=True) if e.get("type") == "directory"]
    except (FileNotFoundError, OSError):
        return []


def fetch(far: str, target: Path, console=None) -> Path:
    """Copy the mirror `far` into the local folder `target` (or ./runs/<name> when its parent
    cannot be made, e.g. a path of another machine); returns the folder. Files land in a
    staging folder renamed into place at the end, so an interrupted fetch leaves no half run."""
    fs, root = open_target(far, "resume")
    target = Path(target)
    if os.environ.get("LOCAL_RANK", "0") != "0":  # under torchrun local rank 0 fetches, the others wait
        return _wait_for_run(target, far)
    if target.exists() and any(target.iterdir()):
        raise UserError(f"cannot fetch {far} into {target}: that folder exists and is not a podium run. "
                        "Move it away and resume again.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        target = Path("runs") / target.name
        target.parent.mkdir(parents=True, exist_ok=True)
    stage = target.with_name(f".{target.name}.{os.getpid()}.fetching")
    files = [p for p in fs.find(root) if not _is_temporary(p.rsplit("/", 1)[-1])]
    if f"{root}/config.yaml" not in files:
        raise UserError(f"resume={far}: the mirror holds no config.yaml yet (the run died before its first files "
                        "were copied); nothing to resume.")
    size, count = 0, 0
    try:
        for path in files:
            rel = path[len(root) + 1:]
            if rel == MARKER:
                continue
            dest = stage / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with fs.open(path, "rb") as src, open(dest, "wb") as dst:
                for block in iter(lambda: src.read(CHUNK), b""):
                    dst.write(block)
                    size += len(block)
            count += 1
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    try:
        if target.exists() and not any(target.iterdir()):
            target.rmdir()
        stage.rename(target)
    except OSError:
        if not (target / "config.yaml").is_file():
            raise
        shutil.rmtree(stage, ignore_errors=True)  # another node on a shared disk fetched it first
    if console is not None:
        console.print(f"fetched {count} files ({size / 2**20:.1f} MiB) from {far} into {target}", highlight=False)
    return target


def _wait_for_run(target: Path, far: str, timeout_s: float = 900.0) -> Path:
    deadline = time.monotonic() + timeout_s
    while True:
        for candidate in (target, Path("runs") / target.name):  # see fetch's fallback
            if (candidate / "config.yaml").is_file():
                return candidate
        if time.monotonic() > deadline:
            raise UserError(f"resume={far}: local rank 0 did not fetch the mirror into {target} within {timeout_s:g} s.")
        time.sleep(0.5)
