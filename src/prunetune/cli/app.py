"""The typer app, its options of every command, and the quieting of the libraries' own output."""

from __future__ import annotations

import os
from typing import Annotated

import typer

# Before torch loads OpenMP: spinning worker threads make every op wait for a descheduled peer when the CPU
# is shared (measured: a SmolLM2 512-token forward 11-17 s spinning vs 3.3 s passive on a loaded 2-core box).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Compress pre-trained transformers by pruning while fine-tuning, with honest evaluation.",
)


@app.callback()
def _options(
    allow_pickle: Annotated[bool, typer.Option(
        "--allow-pickle", help="also load pickle checkpoints (pytorch_model.bin), which can run code when "
        "loaded: only for sources you trust")] = False,
) -> None:
    """Options of every command (also accepted after the command name)."""
    if allow_pickle:
        # only with the flag: models.loading imports torch, which --help must not load
        from prunetune.models.loading import ALLOW_PICKLE_ENV

        os.environ[ALLOW_PICKLE_ENV] = "1"  # read by the loader, inherited by the ranks of a launch

GLOBAL_FLAGS = ("--allow-pickle",)


def global_flags_first(argv: list[str]) -> list[str]:
    """`prunetune eval DIR --allow-pickle` as `prunetune --allow-pickle eval DIR`: click reads a group's
    options before the command name only, users write them anywhere."""
    flags = [a for a in argv if a in GLOBAL_FLAGS]
    return flags + [a for a in argv if a not in GLOBAL_FLAGS]

QUIET_LOGGERS = ("huggingface_hub", "datasets", "httpx", "httpcore", "urllib3", "filelock", "fsspec")


def quiet_libraries() -> None:
    """Our progress bars, tables and one-line errors are the output; silence the libraries' own chatter.

    Offline, a hub lookup that is bound to fail (e.g. `--task no-such-task`) would otherwise print its HTTP
    retries and warnings before prunetune's one line says what is wrong.
    """
    import logging

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers missing is reported where it is used
        pass
    # datasets reads these when (if) it is imported; importing it here to quiet it would load pyarrow and pandas
    # (~100 MiB) into commands that never use it, such as `prunetune prune`
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for mod in ("huggingface_hub.utils.logging",):
        try:  # their own handlers ignore the root's levels; set each library's verbosity too
            lib = __import__(mod, fromlist=["set_verbosity"])
            lib.set_verbosity(logging.CRITICAL)
            getattr(lib, "disable_progress_bar", lambda: None)()
        except Exception:  # pragma: no cover - optional dependency
            pass
