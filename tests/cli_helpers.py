"""Drive `prunetune.cli.main` in-process, the way every CLI test does (one helper, one contract).

`capture` is pytest's `capsys` or `capfd` fixture (`capfd` also sees output written straight to the file
descriptors, e.g. by C extensions). Each call first drops what the test itself printed before, so the
returned text is this command's alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

ERROR_PREFIX = "prunetune: error: "


def _invoke(argv: Sequence[str], capture) -> tuple[int | None, str, str]:
    """Exit code (None when `main` returned normally, as a clean run does), stdout, stderr."""
    from prunetune.cli import main

    capture.readouterr()
    code: int | None = None
    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    out, err = capture.readouterr()
    return code, out, err


def run_cli(argv: Sequence[str], capture) -> tuple[int, str, str]:
    """(exit code, stdout, stderr); the code is 0 when `main` returns normally."""
    code, out, err = _invoke(argv, capture)
    return (0 if code is None else code), out, err


def cli_ok(argv: Sequence[str], capture) -> str:
    """Run a command that must succeed and return its stdout.

    A clean run returns from `main`; any SystemExit (even code 0) fails the test and shows stderr, since the
    CLI only exits explicitly on errors, aborts and interrupts.
    """
    code, out, err = _invoke(argv, capture)
    if code is not None:
        pytest.fail(f"prunetune {' '.join(map(str, argv))} exited with {code}:\n{err[-3000:]}")
    return out


def cli_error(argv: Sequence[str], capture, needle: str | None = None) -> str:
    """Run a command that must fail as a user error; return its one error line.

    The contract: exit code 2, stderr is exactly one line starting with "prunetune: error: " (nothing else,
    not even blank lines), no traceback anywhere, and `needle` (when given) is in that line.
    """
    code, out, err = _invoke(argv, capture)
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    line = err.rstrip("\n")
    assert line.startswith(ERROR_PREFIX) and line[len(ERROR_PREFIX):].strip(), err
    if needle is not None:
        assert needle in line, line
    return line


def labelled_csv(path, labels: Sequence[str], *, seed: int, words_per_text: int = 8):
    """A `text,label` CSV: row i is "doc<i> <label> <random words>", labelled labels[i]. The id keeps every text
    (and its truncated token sequence) distinct; the label word in the text makes the task learnable."""
    import random

    rng = random.Random(seed)
    words = "alpha beta gamma delta river stone light paper green quick slow bright".split()
    rows = ["text,label"] + [f"doc{i:03d} {label} " + " ".join(rng.choice(words) for _ in range(words_per_text))
                             + f",{label}" for i, label in enumerate(labels)]
    path.write_text("\n".join(rows) + "\n")
    return path


def cli_killer(*, rank: str | None = None, call: str = "main(sys.argv[1:])") -> str:
    """Python source that runs the CLI (`call`) with a Trainer that SIGKILLs its own process at the end of
    optimizer step $KILL_AT (on RANK `rank` only, when given): how the resume tests cut a run between
    checkpoints, as a crash or an OOM kill would."""
    when = 'state.global_step == int(os.environ["KILL_AT"])'
    if rank is not None:
        when += f' and os.environ.get("RANK") == "{rank}"'
    return f"""
import os, signal, sys
from transformers import TrainerCallback
import prunetune.tuning.kd_trainer as kt

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if {when}:
            os.kill(os.getpid(), signal.SIGKILL)

init = kt.KDTrainer.__init__
def patched(self, *a, **kw):
    init(self, *a, **kw)
    self.add_callback(Kill())
kt.KDTrainer.__init__ = patched
from prunetune.cli import main
{call}
"""
