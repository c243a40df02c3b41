"""One option schema: the recipe's pydantic specs are the only schema of every option and default. The tuning
module takes the recipe's `tune` section (`TuneSpec`) itself, and PAYT its `payt` section: no twin dataclass, no
converter. What a run's manifest records of its fine-tuning (`TuneSpec.record`, the keys manifests have always
had) is checked here key by key: one table row per recorded option, its value as the schema writes it; a key or
option in no row and in no list of one-sided ones fails the test, so a new option must say where it lives. Every
command is a recipe with a command file and no flag default of its own."""

from __future__ import annotations

import pytest

from prunetune.config import DataSpec, PaytSpec as PaytOptions, TuneSpec, validate_recipe
from prunetune.methods.payt import PaytSpec
from prunetune.pruning.schedules import Schedule

# recorded key -> its value for a spec as the recipe schema writes it (t: TuneSpec, d: DataSpec)
SHARED = {
    "data": lambda t, d: d.train,
    "lora": lambda t, d: t.mode == "lora",
    "lora_rank": lambda t, d: t.lora_rank,
    "lora_alpha": lambda t, d: 2.0 * t.lora_rank if t.lora_alpha is None else t.lora_alpha,
    "lora_dropout": lambda t, d: t.lora_dropout,
    "rslora": lambda t, d: t.rslora,
    "gradient_checkpointing": lambda t, d: t.gradient_checkpointing,
    "lora_roles": lambda t, d: tuple(t.lora_roles) if t.lora_roles is not None else None,
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
    "learning_rate": lambda t, d: t.learning_rate,
}
# recorded keys the run decides (finetune's arguments beside the spec) or the tuning module fixes
RUN_ONLY = {"task": "seq-cls", "seed": 3, "weight_decay": 0.0, "export": False, "grad_accum": 1, "warmup_ratio": 0.0,
            "mask_lora": True}
# TuneSpec fields recorded under another name or through a conversion (every other one keeps its name)
SCHEMA_ONLY = {"mode": "lora", "steps": "n_samples/epochs", "seqlen": "max_length"}
SPECS = [TuneSpec(), TuneSpec(steps=None, n_samples=40, epochs=2.5, lora_rank=4, lora_roles=["q", "v"], kd_alpha=0.3,
                              mode="full", lr=2e-4, seqlen=64)]


def _record(t: TuneSpec, d: DataSpec) -> dict:
    r = t.record(d, task="seq-cls", seed=3, export=False)
    r["mix"] = {k: v for k, v in r["mix"].items() if k != "seed"}
    return r


@pytest.mark.parametrize("spec", SPECS, ids=["default", "set"])
@pytest.mark.parametrize("name", sorted(SHARED))
def test_recorded_tune_setting_is_the_schemas(name, spec):
    d = DataSpec(train="x.csv", split_seed=5)
    assert _record(spec, d)[name] == SHARED[name](spec, d)


def test_every_option_is_recorded_and_every_recorded_key_is_in_the_table():
    rec = TuneSpec().record(DataSpec(), task="seq-cls", seed=3, export=False)
    assert set(rec) == set(SHARED) | set(RUN_ONLY), set(rec) ^ (set(SHARED) | set(RUN_ONLY))
    assert {k: rec[k] for k in RUN_ONLY} == RUN_ONLY
    assert rec["mix"]["seed"] == 3  # data mixing draws with the training seed
    unmapped = set(TuneSpec.model_fields) - set(SHARED) - set(SCHEMA_ONLY)
    assert unmapped == set(), f"TuneSpec options no manifest records: {unmapped}"


def test_the_tuning_module_takes_the_spec_itself():
    """No twin of `TuneSpec` and no converter: `finetune` takes the spec, a stage hands it the recipe's own."""
    import importlib.util
    import inspect

    from prunetune.pipelines.stages import tune_run
    from prunetune.tuning.finetune import finetune

    assert importlib.util.find_spec("prunetune.tuning.config") is None
    assert inspect.signature(finetune).parameters["spec"].annotation in (TuneSpec, "TuneSpec")
    recipe = validate_recipe({"model": {"task": "seq-cls"}, "stages": ["finetune"]})
    assert tune_run(recipe, seed=0) == {"data": recipe.data, "task": "seq-cls", "seed": 0, "export": False}


def test_payt_has_one_schema():
    """PAYT takes the recipe's pydantic `payt` section itself: no twin dataclass, no converter."""
    from prunetune.pipelines import stages

    assert PaytSpec is PaytOptions and not hasattr(stages, "payt_spec")
    spec = PaytSpec(sparsity=0.6, schedule="linear", start=0.1, criterion="magnitude")
    assert spec.criterion == "l1-global"  # PAYT's "magnitude": one global threshold
    assert isinstance(spec, Schedule)  # the schedule keys are the schedule's own schema, not a copy of it
    assert list(PaytSpec.model_fields)[:len(Schedule.model_fields)] == list(Schedule.model_fields)
    assert [e.sparsity for e in spec.plan(10, 10)][-1] == 0.6 and spec.plan(10, 10)[0].step == 1
    assert spec.to_dict() == spec.model_dump()


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_learning_rate_rule_is_one(mode):
    """The per-mode default learning rate is the schema's, and what a run records (1e-3 LoRA, 1e-4 full)."""
    spec = TuneSpec(mode=mode)
    assert spec.record(DataSpec(), task="seq-cls", seed=0, export=False)["learning_rate"] == spec.learning_rate
    assert spec.learning_rate == {"lora": 1e-3, "full": 1e-4}[mode]
    assert TuneSpec(mode=mode, lr=3e-4).learning_rate == 3e-4


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
