"""Untrusted inputs and chained commands (issue 30, items 2 and 7).

A model directory, a checkpoint or a recipe from elsewhere never runs code: no `trust_remote_code`, no pickle
unless asked for (`--allow-pickle`), recipes read with `yaml.safe_load`, and no recipe name can point a stage
outside its run directory. A run directory is itself a model spec: the model it exported.
"""

from __future__ import annotations

import json

import pytest

from cli_helpers import cli_error, cli_ok


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """`prunetune prune tiny-llama --method magnitude --sparsity 0.5 --out runs/a`, run once for this module."""
    import io
    from contextlib import redirect_stdout

    from prunetune.cli import main

    out = tmp_path_factory.mktemp("runs") / "a"
    with redirect_stdout(io.StringIO()):
        main(["prune", "tiny-llama", "--method", "magnitude", "--sparsity", "0.5", "--out", str(out)])
    return out


# --------------------------------------------------------------------------------------------- item 2
def test_run_directory_is_a_model_spec(pruned_run, tmp_path, capfd):
    """info, eval and prune take a run directory and work on the model it exported (runs/a/model)."""
    cli_ok(["info", str(pruned_run), "--no-layers", "--json", str(tmp_path / "i.json")], capfd)
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["source"] == str((pruned_run / "model").resolve())
    assert info["prunable_sparsity"] == pytest.approx(0.5, abs=1e-9)
    (tmp_path / "t.txt").write_text("Some words for a small text file.\n" * 40)
    cli_ok(["eval", str(pruned_run), "--ppl", str(tmp_path / "t.txt"), "--seqlen", "32", "--max-windows", "2",
            "--json", str(tmp_path / "e.json")], capfd)
    assert json.loads((tmp_path / "e.json").read_text())["metrics"]["perplexity"]["value"] > 1
    b = tmp_path / "b"
    cli_ok(["prune", str(pruned_run), "--method", "magnitude", "--sparsity", "0.7", "--out", str(b)], capfd)
    from prunetune.models.loading import load_model
    from prunetune.pruning.masks import sparsity_report

    from prunetune.pruning.api import prune

    again = load_model(str(b), "causal-lm")  # b is a run directory too
    direct = load_model("tiny-llama")
    prune(direct.model, "magnitude", 0.7)  # magnitude from 0.5 to 0.7 = magnitude to 0.7 (zeros are smallest)
    assert sparsity_report(again.model)["sparsity"] == sparsity_report(direct.model)["sparsity"] > 0.68
    first = load_model(str(pruned_run / "model"), "causal-lm")
    for (name, w0), w1 in zip(first.model.named_parameters(), again.model.parameters()):
        if "proj" in name:  # what was pruned in runs/a is still zero in runs/b
            assert bool((w1[w0 == 0] == 0).all()), name


def test_run_directory_without_export_is_one_line(tmp_path, capfd):
    run = tmp_path / "r"
    run.mkdir()
    (run / "recipe.yaml").write_text("name: t\nstages: [evaluate]\n")
    (run / "manifest.json").write_text("{}")
    cli_error(["info", str(run)], capfd, needle="run directory without an exported model")


# --------------------------------------------------------------------------------------------- item 7
def test_remote_code_is_never_run(tmp_path, capfd):
    """A directory whose config asks for its own Python code (auto_map) is refused and the code never runs."""
    d = tmp_path / "evil"
    d.mkdir()
    sentinel = tmp_path / "ran"
    (d / "config.json").write_text(json.dumps({
        "model_type": "evilmodel", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}}))
    (d / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('x')\n")
    (d / "model.safetensors").write_bytes(b"\0" * 16)
    for argv in (["info", str(d)], ["eval", str(d), "--speed"], ["prune", str(d), "--method", "magnitude",
                                                                 "--out", str(tmp_path / "o")]):
        cli_error(argv, capfd)
        assert not sentinel.exists()
    assert not (tmp_path / "o").exists()


def test_pickle_checkpoint_refused_unless_allowed(tmp_path, capfd, monkeypatch):
    from prunetune.models.loading import ALLOW_PICKLE_ENV, load_model

    monkeypatch.setenv(ALLOW_PICKLE_ENV, "0")
    tiny = load_model("tiny-llama")
    d = tmp_path / "bin"
    import torch

    d.mkdir()
    tiny.model.config.save_pretrained(d)  # transformers 5 writes safetensors only: the pickle by hand
    torch.save(tiny.model.state_dict(), d / "pytorch_model.bin")
    tiny.tokenizer.save_pretrained(d)
    assert (d / "pytorch_model.bin").is_file() and not list(d.glob("*.safetensors"))
    line = cli_error(["info", str(d)], capfd, needle="holds only pickle weights (pytorch_model.bin)")
    assert "--allow-pickle" in line
    cli_error(["prune", str(d), "--method", "magnitude", "--out", str(tmp_path / "o")], capfd, needle="pickle")
    assert not (tmp_path / "o").exists()
    cli_ok(["info", str(d), "--no-layers", "--allow-pickle"], capfd)  # opted in: loads (after the command name)
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "0")
    cli_ok(["--allow-pickle", "info", str(d), "--no-layers"], capfd)  # or before it


def test_recipe_yaml_cannot_run_code(tmp_path, capfd):
    sentinel = tmp_path / "ran"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: !!python/object/apply:os.system ['touch {sentinel}']\nstages: [export]\n")
    cli_error(["run", str(recipe), "--out", str(tmp_path / "o")], capfd, needle="not valid YAML")
    assert not sentinel.exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("where", ["stage", "recipe", "set"])
def test_no_stage_writes_outside_its_run_directory(where, tmp_path, capfd):
    """Recipe and stage names become directory names: a name with a path in it is refused before anything runs."""
    recipe = tmp_path / "r.yaml"
    stage = "{type: evaluate, name: ../../escaped}" if where == "stage" else "evaluate"
    name = "../escaped" if where == "recipe" else "t"
    recipe.write_text(f"name: {name}\nmodel: {{name: tiny-llama}}\ndata: {{ppl: []}}\nstages: [{stage}]\n")
    extra = ["--set", "stages.0.name=../../escaped"] if where == "set" else []
    cli_error(["run", str(recipe), "--out", str(tmp_path / "runs" / "o"), *extra], capfd,
              needle="is not a plain name")
    assert not list(tmp_path.rglob("*escaped*")) and not (tmp_path / "runs").exists()
