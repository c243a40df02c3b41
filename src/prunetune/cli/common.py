"""What every command shares: output directories, tables, and a command as a one-stage recipe.

A command's starting point is its recipe file (`pipelines/recipes/commands/NAME.yaml`); every flag given
overrides one key of it (`COMMAND_FLAGS[NAME]`: flag parameter -> recipe key, registered by the command's
module), and the pydantic specs validate the result. No flag that sets a recipe key has a default of its own: a
flag left out keeps the recipe's value (`--print-recipe` shows them all).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

from prunetune.errors import PrunetuneError
from prunetune.rundir import RunLock


NEW_OUTPUTS: list[tuple[Path, Path]] = []  # (output dir, topmost dir it creates): removed if a failure leaves them empty


def claim_out(out: Path) -> Path:
    """Check that `out` can be created before any work starts, and remember to remove it if it stays empty.

    Checked on the nearest existing ancestor: it must be a writable directory. The check runs before the
    model loads, so a typo in --out fails in a second, in one line.
    """
    out = Path(out).expanduser()
    if out.exists():
        if not out.is_dir():
            raise PrunetuneError(f"output path {out} exists and is not a directory")
        return out
    top, anc = out, out.parent
    while not anc.exists() and anc != anc.parent:
        top, anc = anc, anc.parent
    if not anc.is_dir():
        raise PrunetuneError(f"cannot create output directory {out}: {anc} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise PrunetuneError(f"cannot create output directory {out}: {anc} is not writable")
    NEW_OUTPUTS.append((out, top))
    return out


def remove_empty_outputs() -> None:
    """A failed command leaves no empty output directory behind (nor the empty parents it created)."""
    for out, top in reversed(NEW_OUTPUTS):
        d = out
        while d.is_dir() and not any(d.iterdir()):
            try:
                d.rmdir()
            except OSError:
                break
            if d == top:
                break
            d = d.parent
    NEW_OUTPUTS.clear()


def console():
    from rich.console import Console

    return Console()


def write_json(path: Optional[Path], payload: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))


def table(title: str, rows: list[tuple[str, str]]):
    from rich.table import Table

    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in rows:
        t.add_row(k, v)
    return t


#: command -> {flag parameter -> recipe key}; each command's module adds its own
COMMAND_FLAGS: dict[str, dict[str, str]] = {}
ALL_SAMPLES = ("n_samples", "eval_samples", "test_samples")  # 0 on the command line = all of them


def run_and_report(rec, out: Path, *, resume: bool, overwrite: bool, con) -> dict:
    """Run a recipe through the runner, then write its report (the runner does not import reporting; under a
    multi-process launcher, rank 0 writes it)."""
    # at run time, not at import: the runner loads torch and pydantic, reporting matplotlib (fast --help)
    from prunetune.pipelines.runner import is_main_process, run_recipe

    lock = RunLock(out).acquire() if is_main_process() else None  # the report is written under the run's lock too
    try:
        man = run_recipe(rec, out, resume=resume, overwrite=overwrite,
                         log=lambda msg: con.print(msg, highlight=False, soft_wrap=True))
        if is_main_process():  # reporting imports matplotlib: after the run, not resident through its peak
            from prunetune.reporting.report import write_run_report

            write_run_report(out)
    finally:
        if lock is not None:
            lock.release()
    return man


def command_data(command: str, model: str, flags: dict, extra: dict | None = None, base: str | None = None) -> dict:
    """The raw recipe a command runs, before validation: its recipe file (or the preset `base`, run as this
    command's stages) + the flags that were given."""
    # at run time: config loads pydantic and torch, which --help must not load
    from prunetune.config import COMMANDS_DIR, read_recipe_file

    data, _ = read_recipe_file(str(COMMANDS_DIR / f"{command}.yaml"))
    if base is not None:
        stages = data["stages"]
        data, _ = read_recipe_file(base)
        data["stages"] = stages
    data["model"] = {**data.get("model", {}), "name": model}
    mapping = COMMAND_FLAGS[command]
    for name, value in flags.items():
        if value is None or name not in mapping:
            continue
        if name in ALL_SAMPLES and value == 0:
            value = None
        if name == "data_dir":
            value = str(value)
        cur = data
        *parents, last = mapping[name].split(".")
        for part in parents:
            cur = cur.setdefault(part, {})
        cur[last] = value
    lora = flags.get("lora")
    if lora is not None:
        data.setdefault("tune", {})["mode"] = "lora" if lora else "full"
    for key, value in (extra or {}).items():
        section, field = key.split(".")
        data.setdefault(section, {})[field] = value
    return data


def validated_command_recipe(command: str, data: dict, flags: dict):
    """`data` validated; an error names the flag the user typed, not only the recipe key it sets."""
    # at run time: config loads pydantic and torch, which --help must not load
    from prunetune.config import validate_recipe

    mapping = COMMAND_FLAGS[command]
    try:
        return validate_recipe(data, command)
    except PrunetuneError as exc:
        msg = str(exc)
        for name, key in sorted(mapping.items(), key=lambda kv: -len(kv[1])):
            if flags.get(name) is not None and f" {key}:" in msg:
                msg = msg.replace(f" {key}:", f" --{name.replace('_', '-')} ({key}):", 1)
                break
        raise PrunetuneError(msg) from None


def command_recipe(command: str, model: str, flags: dict, extra: dict | None = None, base: str | None = None):
    """The validated one-stage recipe a command runs (`command_data`, then `validated_command_recipe`)."""
    return validated_command_recipe(command, command_data(command, model, flags, extra, base), flags)


def show_recipe(recipe) -> None:
    import yaml

    # at run time: config loads pydantic and torch, which --help must not load
    from prunetune.config import recipe_to_dict

    sys.stdout.write(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))


def default_calib_split(data: dict, calib_split: str | None) -> None:
    """Without `--calib-split`, the calibration source's usual split (WikiText-2 has no train split: valid)."""
    if calib_split is None:
        # at run time: config and pruning.calibrate load pydantic and torch, which --help must not load
        from prunetune.config import DataSpec
        from prunetune.pruning.calibrate import default_calib_split

        d = data.setdefault("data", {})
        d["calib_split"] = default_calib_split(d.get("calib", DataSpec.model_fields["calib"].default))
