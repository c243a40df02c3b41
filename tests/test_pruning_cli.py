"""`prunetune prune`: a one-stage recipe run (OUT/model is a plain HF directory + masks, OUT/manifest.json the
run's manifest); bad input is one line and exit code 2."""

from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import cli_error, cli_ok
from prunetune.pruning.masks import MaskSet


@pytest.fixture()
def calib_file(tmp_path, wikitext_dir):
    f = tmp_path / "calib.txt"
    f.write_text((wikitext_dir / "valid.txt").read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return f


def test_prune_cli_saves_plain_hf_dir(tmp_path, calib_file, capsys):
    from transformers import AutoModelForCausalLM

    from prunetune.data.calibration import calibration_samples
    from prunetune.models.loading import load_model
    from prunetune.pruning.api import prune

    out = tmp_path / "pruned"
    text = cli_ok(["prune", "tiny-llama", "--method", "wanda", "--sparsity", "0.5", "--calib", str(calib_file),
                   "--nsamples", "4", "--seqlen", "128", "--skip", r"layers\.1\.mlp\.down_proj", "--out", str(out)],
                  capsys)
    assert "50" in text
    model_dir = out / "model"
    assert {"model.safetensors", "config.json", "masks.safetensors", "manifest.json"} <= {p.name for p in model_dir.iterdir()}
    assert not (tmp_path / "pruned.partial").exists() and not list((out / "stages").glob("*.partial"))
    man = json.loads((out / "manifest.json").read_text())
    assert man["kind"] == "run" and man["config"]["prune"]["method"] == "wanda" and man["seed"] == 0
    assert man["config"]["prune"]["nsamples"] == 4 and man["versions"]["torch"]
    assert man["metrics"]["01-prune"]["prune_seconds"]["value"] > 0
    layers = json.loads((out / "stages" / "01-prune" / "layer_sparsity.json").read_text())
    assert layers["model.layers.1.mlp.down_proj"]["sparsity"] == 0.0
    assert layers["model.layers.0.mlp.down_proj"]["sparsity"] == 0.5
    out = model_dir

    # plain transformers reload: same logits as the same prune done in memory, masks re-derivable from zeros
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ref = load_model("tiny-llama", "causal-lm")
    ids = calibration_samples(ref.tokenizer, calib_file.read_text(), 4, 128, seed=0)
    masks = prune(ref.model, "wanda", 0.5, calib=ids, skip=[r"layers\.1\.mlp\.down_proj"])
    x = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x).logits, ref.model(input_ids=x).logits)
    saved = MaskSet.load(out)
    assert sorted(saved.names()) == sorted(masks.names())
    derived = MaskSet.from_model(reloaded, saved.names())
    assert all(torch.equal(derived[n], saved[n]) and torch.equal(saved[n], masks[n]) for n in saved.names())


def test_prune_cli_magnitude_with_ppl(tmp_path, calib_file, capsys):
    out = tmp_path / "mag"
    text = cli_ok(["prune", "tiny-llama", "--method", "magnitude", "--pattern", "2:4", "--eval-ppl", str(calib_file),
                   "--max-windows", "1", "--seqlen", "64", "--out", str(out)], capsys)
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    before, after = metrics["01-evaluate"]["ppl/calib.txt"], metrics["03-evaluate"]["ppl/calib.txt"]
    assert before["value"] > 0 and after["value"] > 0 and after["value"] != before["value"]
    assert after["protocol"]["windows"] == 1 and after["protocol"]["seqlen"] == 64
    assert metrics["02-prune"]["sparsity"]["value"] == pytest.approx(0.5)
    assert "perplexity after" in text


@pytest.mark.parametrize("args,needle", [
    (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
    (["--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
    (["--pattern", "4:2"], "0 < N < M"),
    (["--pattern", "2-4"], "must look like '2:4'"),
    (["--method", "random"], "unknown pruning method"),
    (["--granularity", "diagonal"], "unknown granularity"),
    (["--skip", "no_such_layer"], "matches no prunable layer"),
    (["--nsamples", "1000"], "tokens are needed"),
    (["--calib", "/nonexistent/calib.txt"], "does not exist"),
    (["--device", "tpu"], "unknown --device"),
    (["--method", "wanda", "--layer-sparsity", "owl", "--sparsity", "0.97"], "outside [0, 1)"),
    (["--layer-sparsity", "owl", "--owl-lambda", "0.6"], "OWL lambda must be in [0, 0.5)"),
    (["--layer-sparsity", "deep"], "unknown layer sparsity 'deep'"),
    (["--method", "magnitude", "--refine", "dsnot"], "magnitude collects none"),
    (["--method", "admm", "--admm-iters", "0"], "ADMM iterations must be an integer in [1, 10000], got 0"),
    (["--method", "admm", "--admm-damp", "0"], "ADMM damping must be in (0, 10]"),
])
def test_prune_cli_bad_input(tmp_path, calib_file, capsys, args, needle):
    out = tmp_path / "o"
    argv = ["prune", "tiny-llama", "--calib", str(calib_file), "--nsamples", "2", "--seqlen", "64", "--out", str(out)]
    cli_error(argv + args, capsys, needle=needle)
    assert not out.exists() and not (tmp_path / "o.partial").exists()  # nothing half-written


def test_prune_cli_refuses_non_empty_out(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    cli_error(["prune", "tiny-llama", "--method", "magnitude", "--out", str(out)], capsys, needle="--overwrite")
    assert (out / "keep.txt").read_text() == "x"
    cli_ok(["prune", "tiny-llama", "--method", "magnitude", "--out", str(out), "--overwrite"], capsys)
    assert (out / "model" / "masks.safetensors").is_file() and not (out / "keep.txt").exists()


def test_prune_cli_owl_admm_dsnot(tmp_path, calib_file, capsys):
    """The new options reach the engine: OWL's per-block sparsities average to the target, ADMM prunes."""
    out = tmp_path / "owl"
    cli_ok(["prune", "tiny-llama", "--method", "owl-admm", "--sparsity", "0.6", "--refine", "dsnot",
            "--admm-iters", "6", "--calib", str(calib_file), "--nsamples", "4", "--seqlen", "64", "--out", str(out)],
           capsys)
    man = json.loads((out / "manifest.json").read_text())
    spec = man["config"]["prune"]
    assert spec["method"] == "owl-admm" and spec["refine"] == "dsnot" and spec["admm_iters"] == 6
    layers = json.loads((out / "stages" / "01-prune" / "layer_sparsity.json").read_text())
    per = {n: v["sparsity"] for n, v in layers.items()}
    assert len({round(v, 3) for v in per.values()}) > 1  # not uniform
    assert man["metrics"]["01-prune"]["sparsity"]["value"] == pytest.approx(0.6, abs=0.003)
