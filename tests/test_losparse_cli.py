"""`prunetune losparse`: the seed's option names as aliases, one-line errors, the preset, and a tiny end-to-end
run whose two exports (plain HF dir, factorised dir) reload with the trained model's predictions."""

from __future__ import annotations

import json

import pytest
import yaml

from cli_helpers import cli_error, cli_ok
from prunetune.config import load_recipe


def test_seed_names_are_aliases(capsys):
    out = cli_ok(["losparse", "minilm-l6", "--low-rank-parameter-ratio", "0.07", "--final-threshold", "0.12",
                  "--deltaT", "3", "--structured_method", "mean", "--structured_direction", "row_col",
                  "--initial-warmup", "2", "--final-warmup", "4", "--warmup-steps", "6", "--print-recipe"], capsys)
    rec = yaml.safe_load(out)
    ls = rec["losparse"]
    assert (ls["rank_ratio"], ls["keep"], ls["deltaT"]) == (0.07, 0.12, 3)
    assert (ls["structured_method"], ls["structured_direction"]) == ("mean", "row_col")
    assert (ls["initial_warmup"], ls["final_warmup"], ls["warmup_steps"]) == (2.0, 4.0, 6)
    assert rec["tune"]["mode"] == "full" and rec["stages"] == ["losparse", "export"]
    same = yaml.safe_load(cli_ok(["losparse", "minilm-l6", "--rank-ratio", "0.07", "--keep", "0.12", "--delta-t", "3",
                                  "--structured-method", "mean", "--structured-direction", "row_col",
                                  "--initial-warmup", "2", "--final-warmup", "4", "--warmup-steps", "6",
                                  "--print-recipe"], capsys))
    assert same == rec


def test_method_rules_reach_the_recipe_and_beta2_one_is_accepted(capsys):
    """PLATON's window rule (deltaT) and the recomputed final mask are the defaults, a fixed final mask an
    option; beta2 = 1 (uncertainty off, the LoSparse code's default) is accepted. The per-step EMA rule is gone
    (it measured the same as the window rule)."""
    ls = yaml.safe_load(cli_ok(["losparse", "minilm-l6", "--beta2", "1", "--print-recipe"], capsys))["losparse"]
    assert (ls["beta2"], ls["final_mask"]) == (1.0, "recompute") and "platon_ema" not in ls
    ls = yaml.safe_load(cli_ok(["losparse", "minilm-l6", "--final-mask", "fixed", "--print-recipe"],
                               capsys))["losparse"]
    assert ls["final_mask"] == "fixed"


@pytest.mark.parametrize("args,needle", [
    (["--beta2", "1.5"], "--beta2"), (["--platon-ema", "epoch"], "--platon-ema"),
    (["--final-mask", "never"], "--final-mask"),
    (["--rank-ratio", "1.0"], "--rank-ratio"), (["--keep", "0"], "--keep"), (["--keep", "1.2"], "--keep"),
    (["--structured-method", "diag"], "--structured-method"), (["--kd-weight", "1"], "teacher"),
])
def test_bad_options_one_line(capsys, args, needle):
    err = cli_error(["losparse", "minilm-l6", *args, "--print-recipe"], capsys)
    assert needle in err and "\n" not in err.strip()


def test_preset_validates():
    rec = load_recipe("losparse")
    assert rec.losparse.structured_method == "none" and rec.tune.mode == "full"
    assert [s.type for s in rec.stages] == ["losparse", "evaluate", "export"]


@pytest.mark.slow
def test_end_to_end_tiny_run_both_exports_reload(tmp_path, capsys):
    pytest.importorskip("prunetune.tuning.lifecycle")  # the Method driver of `tuning.finetune`
    import torch

    import prunetune

    out = tmp_path / "run"
    cli_ok(["losparse", "tiny-bert", "--task", "bbc-news", "--n-samples", "24", "--epochs", "1", "--batch-size", "4",
            "--max-length", "32", "--eval-samples", "4", "--test-samples", "20", "--rank-ratio", "0.2", "--keep", "0.3",
            "--initial-warmup-steps", "1", "--final-warmup-steps", "2", "--delta-t", "1", "--out", out], capsys)
    stage = next(p for p in sorted((out / "stages").iterdir()) if p.name.endswith("-losparse"))
    facts = json.loads((stage / "losparse.json").read_text())
    assert facts["losparse_mask_fixed"] and facts["losparse"]["parameters"]["sparse_fraction"] == pytest.approx(
        0.3, abs=1e-3)
    plain = prunetune.load_model(str(stage / "model"), "seq-cls", num_labels=5)
    fac = prunetune.load_model(str(stage / "factorized"))
    enc = plain.tokenizer(["markets rallied", "the cup final", "a new phone"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = plain.model(**enc).logits, fac.model(**enc).logits
    assert torch.allclose(a, b, atol=1e-4)
