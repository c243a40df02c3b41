"""`manifest.json`: how a result was made (config, versions, seed, git rev, timings, metrics with protocol)."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("prunetune", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "lm_eval")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_rev() -> str | None:
    """The commit of the prunetune checkout in use (None when installed from a wheel)."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def build_manifest(kind: str, config: dict[str, Any], *, seed: int | None = None, metrics: dict | None = None,
                   timings: dict | None = None, extra: dict | None = None) -> dict:
    """A manifest dict; every metric should carry its own `protocol` entry."""
    import torch

    man = {
        "kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "seed": seed,
        "versions": package_versions(),
        "git_rev": git_rev(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "timings": timings or {},
        "metrics": metrics or {},
    }
    if extra:
        man.update(extra)
    return man


def write_manifest(path: Path | str, manifest: dict) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, default=str))
    return path
