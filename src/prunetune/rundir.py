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

    from prunetune.errors import PrunetuneError

    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise PrunetuneError(f"{run_dir} is not a prunetune run directory (no {MANIFEST})")
    stages = [{**read_json(d / MANIFEST), "dir": str(d)} for d in stage_dirs(run_dir)]
    recipe = yaml.safe_load((run_dir / RECIPE).read_text()) if (run_dir / RECIPE).is_file() else {}
    return {"dir": str(run_dir), "manifest": read_json(run_dir / MANIFEST), "recipe": recipe,
            "stages": stages, "name": run_dir.name}
