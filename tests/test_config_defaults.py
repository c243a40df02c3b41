"""One option schema: the tuning module's `TuneConfig` takes every default a recipe can set from the pydantic
recipe specs (`prunetune.config`), and PAYT takes its `payt` section itself. One table row per shared option; a
field on either side that is in no row and in no list of one-sided options fails the test, so a new option must
say where it lives. Every command is a recipe with a command file and no flag default of its own."""

from __future__ import annotations

from dataclasses import asdict, fields

import pytest

from prunetune.config import DataSpec, PaytSpec as PaytOptions, TuneSpec, validate_recipe
from prunetune.methods.payt import PaytSpec
from prunetune.tuning.config import TuneConfig

# TuneConfig field -> its default as the recipe schema writes it (t: TuneSpec(), d: DataSpec())
SHARED = {
    "data": lambda t, d: d.train,
    "lora": lambda t, d: t.mode == "lora",
    "lora_rank": lambda t, d: t.lora_rank,
    "lora_alpha": lambda t, d: 2.0 * t.lora_rank if t.lora_alpha is None else t.lora_alpha,
    "lora_dropout": lambda t, d: t.lora_dropout,
    "rslora": lambda t, d: t.rslora,
    "gradient_checkpointing": lambda t, d: t.gradient_checkpointing,
    "lora_roles": lambda t, d: t.lora_roles,
    "kd": lambda t, d: t.kd,
    "kd_alpha": lambda t, d: t.kd_alpha,
    "kd_temp": lambda t, d: t.kd_temp,
    "teacher": lambda t, d: t.teacher,
    "epochs": lambda t, d: 1.0 if t.steps is not None else t.epochs,  # `steps` = steps x batch in one epoch
    "lr": lambda t, d: t.lr,
    "batch_size": lambda t, d: t.batch_size,
    "max_length": lambda t, d: t.seqlen,
    "n_samples": lambda t, d: t.steps * t.batch_size if t.steps is not None else t.n_samples,
    "eval_samples": lambda t, d: t.eval_samples,
    "test_samples": lambda t, d: t.test_samples,
    "split_seed": lambda t, d: d.split_seed,
    "data_dir": lambda t, d: d.data_dir,
    "mix": lambda t, d: {k: getattr(t.mix, k) for k in ("fraction", "source", "split", "strategy", "sampling")},
    "retention": lambda t, d: t.retention,
    "retention_windows": lambda t, d: t.retention_windows,
    "save_steps": lambda t, d: t.save_steps,
}
TUNING_ONLY = {"task", "seed", "grad_accum", "weight_decay", "warmup_ratio", "export", "mask_lora"}
# TuneSpec fields that reach TuneConfig through another name or a conversion (every other one keeps its name)
SCHEMA_ONLY = {"mode": "lora", "steps": "n_samples/epochs", "seqlen": "max_length"}


def _value(cfg: TuneConfig, name: str):
    v = getattr(cfg, name)
    if name == "mix":
        return {k: getattr(v, k) for k in ("fraction", "source", "split", "strategy", "sampling")}
    return v


@pytest.mark.parametrize("name", sorted(SHARED))
def test_tune_config_default_is_the_recipe_schemas(name):
    assert _value(TuneConfig(), name) == SHARED[name](TuneSpec(), DataSpec())


def test_every_option_is_in_the_table_or_declared_one_sided():
    cfg_fields = {f.name for f in fields(TuneConfig)}
    assert cfg_fields == set(SHARED) | TUNING_ONLY, cfg_fields ^ (set(SHARED) | TUNING_ONLY)
    unmapped = set(TuneSpec.model_fields) - set(SHARED) - set(SCHEMA_ONLY) - {"lora_alpha"}
    assert unmapped == set(), f"TuneSpec options the tuning module never receives: {unmapped}"


def test_a_default_recipe_converts_to_the_dataclass_defaults():
    from prunetune.pipelines.stages import tune_config

    recipe = validate_recipe({"model": {"task": "seq-cls"}, "stages": ["finetune"]})
    assert asdict(tune_config(recipe, recipe.tune, seed=0)) == asdict(TuneConfig(export=False))


def test_payt_has_one_schema():
    """PAYT takes the recipe's pydantic `payt` section itself: no twin dataclass, no converter."""
    from prunetune.pipelines import stages

    assert PaytSpec is PaytOptions and not hasattr(stages, "payt_spec")
    spec = PaytSpec(sparsity=0.6, schedule="linear", start=0.1, criterion="magnitude")
    assert spec.criterion == "l1-global"  # PAYT's "magnitude": one global threshold
    sched = spec.as_schedule()
    assert (sched.kind, sched.target, sched.start, sched.end) == ("linear", 0.6, 0.1, 1.0)
    assert spec.to_dict() == spec.model_dump()


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_learning_rate_rule_is_one(mode):
    """The per-mode default learning rate is the schema's on both sides (1e-3 LoRA, 1e-4 full)."""
    spec = TuneSpec(mode=mode)
    assert TuneConfig(lora=mode == "lora").learning_rate == spec.learning_rate == {"lora": 1e-3, "full": 1e-4}[mode]
    assert TuneConfig(lora=mode == "lora", lr=3e-4).learning_rate == TuneSpec(mode=mode, lr=3e-4).learning_rate


def _recipe_commands() -> list[str]:
    from prunetune import cli

    return sorted(cli.COMMANDS)


def test_every_recipe_command_has_a_recipe_file_and_a_flag_table():
    """Every command that runs a recipe starts from its own file, and every command is in the table."""
    from prunetune import cli
    from prunetune.config import COMMANDS_DIR

    assert set(cli.COMMANDS) == set(cli.COMMAND_FLAGS) == {p.stem for p in COMMANDS_DIR.glob("*.yaml")}
    assert {"prune", "shrink", "finetune", "payt", "losparse", "compose"} <= set(cli.COMMANDS)


@pytest.mark.parametrize("command", _recipe_commands())
def test_command_flags_carry_no_default_of_their_own(command):
    """A flag that sets a recipe key defaults to None: the command's recipe file and the specs hold the value."""
    import inspect

    from prunetune import cli

    params = inspect.signature(cli.COMMANDS[command]).parameters
    own = {}
    for flag in cli.COMMAND_FLAGS[command]:
        if flag not in params:
            continue
        default = params[flag].default
        default = getattr(default, "default", default)  # typer.Option(...) keeps its default inside
        if default is not None:
            own[flag] = default
    assert not own, f"{command} flags with their own defaults: {own}"
    assert any(f in params for f in cli.COMMAND_FLAGS[command])


@pytest.mark.parametrize("command", _recipe_commands())
def test_a_command_without_flags_runs_its_recipe_file(command, capsys):
    """Every command is a recipe: with no flag, `--print-recipe` prints its recipe file (the model named on the
    command line), so each default lives in that file or in the specs, nowhere in the CLI."""
    import yaml

    from cli_helpers import cli_ok
    from prunetune.config import COMMANDS_DIR, read_recipe_file, recipe_to_dict

    data, _ = read_recipe_file(str(COMMANDS_DIR / f"{command}.yaml"))
    data["model"] = {**data.get("model", {}), "name": "tiny-llama"}
    printed = yaml.safe_load(cli_ok([command, "tiny-llama", "--print-recipe"], capsys))
    assert printed == recipe_to_dict(validate_recipe(data, command))
