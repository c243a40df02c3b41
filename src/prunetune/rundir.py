"""The on-disk format of results: atomic writes and the run directory (the lowest layer; imports nothing of ours).

Every file or directory prunetune publishes appears whole or not at all: it is written beside its final name,
flushed and fsynced, then renamed (a rename within one filesystem is atomic on POSIX). Without the fsync a
crash shortly after the rename can leave a complete-looking name over empty or partial data, because the
kernel may commit the rename before the data. Files are created with plain `open()`, so they get the user's
umask (tempfile.mkstemp would make them 0600).

A run directory (written by `pipelines.runner`, read by `reporting` and `--resume`)::

    OUT/recipe.yaml               the validated recipe
    OUT/manifest.json             recipe, versions, seed, git rev, timings and metrics of every stage
    OUT/stages/NN-<type>/         one directory per stage; complete exactly when its manifest.json exists

It lives here, below both writer and readers, so that the runner never imports the report and the report
never imports the runner.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prunetune.errors import PrunetuneError

PARTIAL = ".partial"


# --------------------------------------------------------------------------------------------- atomic writes
def _fsync_dir(path: Path) -> None:
    """Persist a directory entry (the rename itself); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path | str) -> None:
    """fsync every file below `root` and every directory, so a later rename publishes durable data."""
    root = Path(root)
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if p.is_symlink():
                continue
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def umask_modes(root: Path | str) -> None:
    """Give every file and directory below `root` the modes the user's umask allows (0644/0755 under 022).

    Some writers (safetensors' `save_file`, `tempfile`) create files 0600; published results follow the umask.
    """
    mask = os.umask(0)
    os.umask(mask)
    for dirpath, dirs, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{PARTIAL}")
    try:
        with open(tmp, "wb") as fh:  # plain open: the user's umask decides the mode
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: Path | str, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: Path | str, obj: Any, indent: int | None = 2) -> Path:
    """JSON (non-JSON values written with `str`, e.g. paths and dtypes) written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=str))


@contextmanager
def atomic_dir(out: Path | str, manifest: dict | None = None) -> Iterator[Path]:
    """Yield a temp dir beside `out`; on success (manifest written, everything fsynced) it replaces `out`.

    On an exception the temp dir is removed and `out` is left as it was: all or nothing.
    """
    out = Path(out)
    tmp = out.with_name(f"{out.name}.{os.getpid()}{PARTIAL}")  # per process: concurrent writers never share one
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if manifest is not None:
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        umask_modes(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    _fsync_dir(out.parent)


# --------------------------------------------------------------------------------------------- run directory
MANIFEST = "manifest.json"
RECIPE = "recipe.yaml"


def read_json(path: Path | str) -> dict:
    return json.loads(Path(path).read_text())


def is_complete(stage_dir: Path | str) -> bool:
    """A stage directory is complete exactly when its manifest exists (written last, then renamed in)."""
    return (Path(stage_dir) / MANIFEST).is_file()


def is_run_dir(run_dir: Path | str) -> bool:
    return (Path(run_dir) / MANIFEST).is_file()


def stage_dirs(run_dir: Path | str) -> list[Path]:
    """The complete stage directories of a run, in order."""
    return [d for d in sorted((Path(run_dir) / "stages").glob("[0-9]*")) if d.is_dir() and is_complete(d)]


def load_run(run_dir: Path | str) -> dict:
    """A finished (or partial) run as data: recipe, run manifest and stage manifests in order."""
    import yaml

    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise PrunetuneError(f"{run_dir} is not a prunetune run directory (no {MANIFEST})")
    stages = [{**read_json(d / MANIFEST), "dir": str(d)} for d in stage_dirs(run_dir)]
    recipe = yaml.safe_load((run_dir / RECIPE).read_text()) if (run_dir / RECIPE).is_file() else {}
    return {"dir": str(run_dir), "manifest": read_json(run_dir / MANIFEST), "recipe": recipe,
            "stages": stages, "name": run_dir.name}


# --------------------------------------------------------------------------------------------- one writer
LOCK = ".prunetune.lock"


def entries(run_dir: Path | str) -> list[Path]:
    """What a run directory holds besides its lock file and the temp files of writes a kill cut short (a
    directory holding only those is empty: nothing in it was ever published)."""
    run_dir = Path(run_dir)
    return [p for p in run_dir.iterdir() if p.name != LOCK and not p.name.endswith(PARTIAL)] if run_dir.is_dir() else []


def remove_partials(run_dir: Path | str) -> None:
    """Drop the temp files and directories of writes a killed process left at the top of a run directory."""
    for p in Path(run_dir).glob(f"*{PARTIAL}"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def read_lock(run_dir: Path | str) -> dict:
    try:
        info = json.loads((Path(run_dir) / LOCK).read_text())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


class RunLock:
    """One writer per run directory: an exclusive `flock` on `OUT/.prunetune.lock`, which names its holder.

    Why flock: the kernel drops the lock when its process dies, SIGKILL included, so a lock left by a killed
    run is stale by construction and the next writer takes it over without guessing from pids (a recycled
    pid, a process on another host). The file's text (pid, host, start time) is only for the refusal message.
    The lock is taken before anything in the directory is touched (even by `--overwrite`) and the file is
    removed when the run ends; a writer that took a file another one unlinked meanwhile tries again.
    """

    _held: dict[str, RunLock] = {}  # taken by this process: a nested acquire (the CLI around the runner) is free

    def __init__(self, run_dir: Path | str) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.fd: int | None = None
        self.created: list[Path] = []
        self.nested = False
        self.took_over: dict | None = None  # the holder of a stale lock this one replaced

    def acquire(self) -> RunLock:
        """Take the lock or raise PrunetuneError naming who holds it."""
        import datetime as _dt
        import socket

        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no locking
            return self
        key = str(self.run_dir.resolve())
        if key in RunLock._held:
            self.nested = True
            self.took_over = RunLock._held[key].took_over
            return self
        d = self.run_dir
        while not d.exists() and d != d.parent:  # the directories this lock makes (removed again if left empty)
            self.created.append(d)
            d = d.parent
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                who = read_lock(self.run_dir)
                desc = ", ".join(f"{k} {who[k]}" for k in ("pid", "host", "started") if k in who)
                raise PrunetuneError(f"{self.run_dir} is in use by another prunetune process ({desc or 'unknown'}); "
                                     "wait for it to end or use another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file between our open and flock: take a fresh one
                os.close(fd)
                continue
            old = os.read(fd, 4096)
            if old.strip():
                try:
                    self.took_over = json.loads(old)
                except ValueError:
                    self.took_over = {}
            me = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
            self.fd = fd
            RunLock._held[key] = self
            return self
        raise PrunetuneError(f"{self.run_dir}: could not take the lock {LOCK} (it keeps changing)")

    def release(self) -> None:
        if self.fd is None:
            return
        RunLock._held.pop(str(self.run_dir.resolve()), None)
        try:
            self.path.unlink(missing_ok=True)  # unlinked while held: a waiting writer sees the inode change
        finally:
            os.close(self.fd)
            self.fd = None
        for d in self.created:  # a run refused before writing anything leaves no empty directory behind
            if not d.is_dir() or any(d.iterdir()):
                break
            d.rmdir()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
