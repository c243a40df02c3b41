"""One option schema: the tuning module's `TuneConfig` and PAYT's `PaytSpec` take every default a recipe can set
from the pydantic recipe specs (`prunetune.config`). One table row per shared option; a field on either side
that is in no row and in no list of one-sided options fails the test, so a new option must say where it lives."""

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
    from prunetune.pipelines.stages import payt_spec, tune_config

    recipe = validate_recipe({"model": {"task": "seq-cls"}, "stages": ["finetune"]})
    assert asdict(tune_config(recipe, recipe.tune, seed=0)) == asdict(TuneConfig(export=False))
    assert payt_spec(PaytOptions()) == PaytSpec()


@pytest.mark.parametrize("name", sorted(PaytOptions.model_fields))
def test_payt_spec_default_is_the_recipe_schemas(name):
    assert getattr(PaytSpec(), name) == getattr(PaytOptions(), name)


def test_payt_spec_fields_are_the_schemas():
    assert {f.name for f in fields(PaytSpec)} == set(PaytOptions.model_fields)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_learning_rate_rule_is_one(mode):
    """The per-mode default learning rate is the schema's on both sides (1e-3 LoRA, 1e-4 full)."""
    spec = TuneSpec(mode=mode)
    assert TuneConfig(lora=mode == "lora").learning_rate == spec.learning_rate == {"lora": 1e-3, "full": 1e-4}[mode]
    assert TuneConfig(lora=mode == "lora", lr=3e-4).learning_rate == TuneSpec(mode=mode, lr=3e-4).learning_rate


@pytest.mark.parametrize("command, fn", [("prune", "prune_cmd"), ("shrink", "shrink_cmd"), ("finetune", "finetune"),
                                         ("payt", "payt"), ("losparse", "losparse")])
def test_command_flags_carry_no_default_of_their_own(command, fn):
    """A flag that sets a recipe key defaults to None: the command's recipe file and the specs hold the value."""
    import inspect

    from prunetune import cli

    params = inspect.signature(getattr(cli, fn)).parameters
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
