"""Command line (typer): one module per command; thin: flags -> one-stage recipe -> runner. No algorithm here.

`app` (cli/app.py) is the typer app; each command module registers its command on it and its flags in
`common.COMMAND_FLAGS`; importing this package imports them all. `main` (cli/main.py) is the console script:
every user mistake ends as one line on stderr and exit code 2; tracebacks are for bugs.

Importing the CLI loads neither torch nor pydantic nor matplotlib, so `prunetune --help` answers at once: a
command imports the modules that load them inside its function, when it runs (each such import says so).
"""

from __future__ import annotations

from prunetune.cli.app import app
from prunetune.cli.common import COMMAND_FLAGS
from prunetune.cli.compose import compose
from prunetune.cli.evaluate import eval_cmd
from prunetune.cli.info import info
from prunetune.cli.losparse import losparse
from prunetune.cli.main import main
from prunetune.cli.prune import prune_cmd
from prunetune.cli.run import compare, recipes, run
from prunetune.cli.shrink import shrink_cmd
from prunetune.cli.tune import finetune, payt

#: command -> the function typer runs for it (the commands that are one-stage recipes)
COMMANDS = {"prune": prune_cmd, "shrink": shrink_cmd, "finetune": finetune, "payt": payt, "losparse": losparse,
            "compose": compose}

__all__ = ["COMMANDS", "COMMAND_FLAGS", "app", "compare", "eval_cmd", "info", "main", "recipes", "run"]
