"""`prunetune shrink` (structured pruning that shrinks the model), the `structured` preset, eval --speed on it."""

from __future__ import annotations

import json

import pytest
import yaml
from transformers import AutoModelForCausalLM

from cli_helpers import ERROR_PREFIX, cli_ok, run_cli


def test_shrink_command_exports_a_smaller_model_that_loads_plainly(tmp_path, capsys):
    out = tmp_path / "run"
    cli_ok(["shrink", "tiny-llama", "--method", "vib", "--structures", "heads,neurons", "--sparsity", "0.3",
            "--round-to", "8", "--vib-steps", "2", "--nsamples", "4", "--seqlen", "64", "--out", out], capsys)
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    cfg = model.config
    assert cfg.intermediate_size < 128 and cfg.intermediate_size % 8 == 0
    assert model.model.layers[0].mlp.up_proj.weight.shape == (cfg.intermediate_size, cfg.hidden_size)
    facts = json.loads(next((out / "stages").glob("*-structured/structured.json")).read_text())
    assert facts["method"] == "vib" and facts["vib"]["budget"] == "2 steps x 2 x 64 tokens"
    assert facts["block_sparsity"] == pytest.approx(0.3, abs=0.05)
    speed = cli_ok(["eval", out / "model", "--speed"], capsys)
    assert "generate" in speed and "parameters" in speed


def test_shrink_print_recipe_is_a_runnable_recipe(capsys):
    text = cli_ok(["shrink", "tiny-llama", "--method", "flap", "--sparsity", "0.2", "--out", "unused",
                   "--print-recipe"], capsys)
    rec = yaml.safe_load(text)
    assert rec["structured"]["method"] == "flap" and rec["structured"]["sparsity"] == 0.2
    assert [s if isinstance(s, str) else s["type"] for s in rec["stages"]] == ["structured", "export"]


def test_shrink_longer_budget_flags_reach_the_recipe(capsys):
    """The README's 4x-budget command: every flag lands in the recipe's structured section, and the gate lrs
    keep their 16-step reference (vib_lr_steps), so 64 steps run at a quarter of them."""
    text = cli_ok(["shrink", "tiny-llama", "--method", "vib", "--sparsity", "0.5", "--vib-steps", "64", "--vib-mu-lr",
                   "0.2", "--lagrangian-step", "gap", "--vib-neuron-ranking", "vib", "--split", "equal", "--out",
                   "unused", "--print-recipe"], capsys)
    st = yaml.safe_load(text)["structured"]
    assert (st["vib_steps"], st["vib_mu_lr"], st["lagrangian_step"], st["vib_neuron_ranking"], st["split"]) == (
        64, 0.2, "gap", "vib", "equal")
    assert st["vib_lr_steps"] == 16


@pytest.mark.parametrize("argv, words", [
    (["--method", "l2", "--structures", "heads", "--sparsity", "0.9"], "every KV group"),
    (["--method", "l2", "--round-to", "512"], "larger than the neurons dimension"),
    (["--method", "taylor"], "method"),
    (["--structures", "heads,rows"], "structures"),
])
def test_shrink_bad_inputs_are_one_line_errors(tmp_path, capsys, argv, words):
    code, _, err = run_cli(["shrink", "tiny-llama", *argv, "--out", tmp_path / "o"], capsys)
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.startswith(ERROR_PREFIX)]
    assert len(lines) == 1 and words in lines[0], err


def test_structured_preset_validates():
    from prunetune.config import load_recipe

    rec = load_recipe("structured")
    assert [s.type for s in rec.stages] == ["evaluate", "structured", "evaluate", "finetune", "evaluate", "export"]
    assert rec.structured.method == "vib" and rec.structured.round_to == 64
