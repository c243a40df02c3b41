"""The entry point: every user mistake ends as one line on stderr and exit code 2; tracebacks are for bugs."""

from __future__ import annotations

import errno
import sys

import typer

from prunetune.cli.app import app, global_flags_first
from prunetune.cli.common import NEW_OUTPUTS, remove_empty_outputs
from prunetune.errors import PrunetuneError


#: options that take several values after one flag (`compose --attention 0.25 0.5`), as in the seed
MULTI_VALUE_OPTIONS = ("--attention", "--linear")


def expand_multi_value(argv: list[str]) -> list[str]:
    """`--attention 0.25 0.5` -> `--attention 0.25 --attention 0.5` (click options take one value each)."""
    out: list[str] = []
    current = None
    for tok in argv:
        if tok in MULTI_VALUE_OPTIONS:
            current = tok
            out.append(tok)
            continue
        if current is not None and not tok.startswith("-") and out[-1] != current:
            out += [current, tok]
            continue
        if tok.startswith("-") and not _is_number(tok):
            current = None
        out.append(tok)
    return out


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


def _click_modules() -> list:
    """click's exception modules: the real click and typer's vendored copy (typer >= 0.20) when present."""
    mods = []
    for name in ("click.exceptions", "typer._click.exceptions"):
        try:
            mods.append(__import__(name, fromlist=["ClickException"]))
        except ImportError:
            pass
    return mods

# the file-system errors a user causes (a path that cannot be written, a full disk): one line, not a traceback
_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.ENOSPC, errno.EEXIST,
                errno.EISDIR, errno.EDQUOT}


def _say(line: str) -> None:
    """One line on stderr in a single write: stderr writes through, so `print` would send the text and its
    newline as two writes, and the ranks of a multi-process launch, which share the pipe, interleave them into
    one garbled line."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user errors (ours and click's) become one line on stderr and exit code 2."""
    click_errors = tuple({getattr(m, "ClickException") for m in _click_modules()})
    exit_types = tuple({getattr(m, "Exit", typer.Exit) for m in _click_modules()} | {typer.Exit})
    abort_types = tuple({getattr(m, "Abort", typer.Abort) for m in _click_modules()} | {typer.Abort})
    NEW_OUTPUTS.clear()
    try:
        args = global_flags_first(expand_multi_value(list(sys.argv[1:] if argv is None else argv)))
        code = app(args=args, prog_name="prunetune", standalone_mode=False)
        if code == 130:  # Ctrl-C: typer turns it into exit code 130, which this mode returns instead of exiting
            raise KeyboardInterrupt
    except PrunetuneError as exc:
        remove_empty_outputs()
        _say(f"prunetune: error: {exc}")
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in _USER_ERRNOS:
            raise
        remove_empty_outputs()
        where = f": {exc.filename}" if exc.filename else ""
        _say(f"prunetune: error: {exc.strerror or exc}{where}")
        sys.exit(2)
    except click_errors as exc:
        msg = " ".join(exc.format_message().split())
        if msg:  # a bare `prunetune` already printed its help
            _say(f"prunetune: error: {msg}")
        sys.exit(2)
    except exit_types as exc:
        sys.exit(exc.exit_code)
    except abort_types:
        _say("prunetune: aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        _say("prunetune: interrupted")
        sys.exit(130)
