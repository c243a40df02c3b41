"""The bad-input table over every command (issue 30, item 1).

Each row is one mistake a user makes. For every row: exit status 2, at most three lines on stderr (in fact
one, `prunetune: error: ...`), no traceback, nothing left at a fresh `--out`, and, run again with `--out`
pointing at a previous complete run, that run is untouched (every file's bytes and mtime). Checks that can
only fail once work has started (a calibration shape, a linear criterion composability cannot score with) are
made before any work: the fresh `--out` staying absent shows it. (`compose --linear-criterion wanda`, once such a
row, now runs: its baseline arm captures the activations too, tests/test_composable.py.)

The table's row counts per command are quoted in BENCHMARKS.md (`test_table_covers_every_command` keeps them).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cli_helpers import labelled_csv, run_cli

OUT = "{out}"  # replaced by a fresh path, then by the path of a previous complete run
COMMANDS = ("info", "eval", "prune", "shrink", "finetune", "payt", "losparse", "compose", "run", "recipes", "compare")

# (id, argv, a phrase of the error line); {d} is the fixture directory of bad files
CASES: list[tuple[str, list[str], str]] = [
    # ---------------------------------------------------------------------------------------------- info
    ("info-unknown-model", ["info", "no-such-model-xyz"], "not a known alias"),
    ("info-missing-path", ["info", "{d}/nowhere/model"], "neither a model directory nor a .gguf"),
    ("info-corrupt-safetensors", ["info", "{d}/corrupt_st"], "cannot load model weights"),
    ("info-gguf-not-a-model", ["info", "{d}/garbage.gguf"], "cannot read GGUF file"),
    ("info-no-tokenizer", ["info", "{d}/no_tokenizer"], "cannot load a tokenizer"),
    ("info-no-argument", ["info"], "Missing argument"),
    ("info-run-without-export", ["info", "{d}/run_no_export"], "run directory without an exported model"),
    # ---------------------------------------------------------------------------------------------- eval
    ("eval-task-missing", ["eval", "tiny-bert", "--task", "{d}/nope.csv"], "does not exist"),
    ("eval-ppl-empty", ["eval", "tiny-llama", "--ppl", "{d}/empty.txt"], "is empty"),
    ("eval-task-mis-columned", ["eval", "tiny-bert", "--task", "{d}/miscol.csv"], "no column 'text'"),
    ("eval-task-corrupt-jsonl", ["eval", "tiny-bert", "--task", "{d}/corrupt.jsonl"], "corrupt.jsonl"),
    ("eval-seqlen-one", ["eval", "tiny-llama", "--ppl", "{d}/ok.txt", "--seqlen", "1"], "--seqlen"),
    ("eval-batch-zero", ["eval", "tiny-llama", "--ppl", "{d}/ok.txt", "--batch-size", "0"], "--batch-size"),
    ("eval-nothing", ["eval", "tiny-llama"], "nothing to evaluate"),
    ("eval-bad-split", ["eval", "tiny-llama", "--ppl", "wikitext2", "--split", "dev"], "unknown WikiText-2 split"),
    ("eval-max-windows-zero", ["eval", "tiny-llama", "--ppl", "{d}/ok.txt", "--max-windows", "0"], "--max-windows"),
    ("eval-corrupt-model", ["eval", "{d}/corrupt_st", "--speed"], "cannot load model weights"),
    # ---------------------------------------------------------------------------------------------- prune
    ("prune-unknown-method", ["prune", "tiny-llama", "--method", "foo", "--out", OUT], "foo"),
    ("prune-sparsity-one", ["prune", "tiny-llama", "--sparsity", "1.0", "--out", OUT], "sparsity"),
    ("prune-sparsity-negative", ["prune", "tiny-llama", "--sparsity", "-0.1", "--out", OUT], "sparsity"),
    ("prune-nm-reversed", ["prune", "tiny-llama", "--pattern", "4:2", "--out", OUT], "0 < N < M"),
    ("prune-nm-garbage", ["prune", "tiny-llama", "--pattern", "abc", "--out", OUT], "must look like '2:4'"),
    ("prune-nm-indivisible", ["prune", "tiny-llama", "--method", "magnitude", "--pattern", "2:3", "--out", OUT],
     "divisible by 3"),
    ("prune-unknown-granularity", ["prune", "tiny-llama", "--granularity", "foo", "--out", OUT], "granularity"),
    ("prune-sparsegpt-global", ["prune", "tiny-llama", "--method", "sparsegpt", "--granularity", "global",
                                "--out", OUT], "global"),
    ("prune-nsamples-zero", ["prune", "tiny-llama", "--nsamples", "0", "--out", OUT], "--nsamples"),
    ("prune-calib-missing", ["prune", "tiny-llama", "--calib", "{d}/nope.txt", "--out", OUT], "does not exist"),
    ("prune-unknown-device", ["prune", "tiny-llama", "--device", "tpu", "--out", OUT], "unknown --device"),
    ("prune-no-out", ["prune", "tiny-llama", "--method", "magnitude"], "needs --out"),
    ("prune-out-non-empty", ["prune", "tiny-llama", "--method", "magnitude", "--out", "{d}/nonempty"],
     "exists and is not empty"),
    ("prune-out-is-file", ["prune", "tiny-llama", "--method", "magnitude", "--out", "{d}/ok.txt"],
     "is not a directory"),
    ("prune-out-unwritable", ["prune", "tiny-llama", "--method", "magnitude", "--out", "/proc/prunetune-no/x"],
     "/proc"),
    ("prune-resume-and-overwrite", ["prune", "tiny-llama", "--method", "magnitude", "--resume", "--overwrite",
                                    "--out", OUT], "--resume and --overwrite"),
    ("prune-eval-ppl-encoder", ["prune", "tiny-bert", "--method", "magnitude", "--eval-ppl", "{d}/ok.txt",
                                "--out", OUT], "needs a causal LM"),
    ("prune-gguf-not-a-model", ["prune", "{d}/garbage.gguf", "--method", "magnitude", "--out", OUT],
     "cannot read GGUF file"),
    ("prune-corrupt-safetensors", ["prune", "{d}/corrupt_st", "--method", "magnitude", "--out", OUT],
     "cannot load model weights"),
    # ---------------------------------------------------------------------------------------------- shrink
    ("shrink-unknown-method", ["shrink", "tiny-llama", "--method", "foo", "--out", OUT], "foo"),
    ("shrink-sparsity-high", ["shrink", "tiny-llama", "--sparsity", "1.5", "--out", OUT], "sparsity"),
    ("shrink-unknown-structure", ["shrink", "tiny-llama", "--structures", "rows", "--out", OUT], "rows"),
    ("shrink-round-to-zero", ["shrink", "tiny-llama", "--round-to", "0", "--out", OUT], "round"),
    ("shrink-unknown-vib-loss", ["shrink", "tiny-llama", "--vib-loss", "mse", "--out", OUT], "mse"),
    ("shrink-encoder-hidden", ["shrink", "tiny-bert", "--method", "l1", "--structures", "hidden", "--out", OUT],
     "is an encoder"),
    ("shrink-no-out", ["shrink", "tiny-llama", "--method", "l1"], "needs --out"),
    # ---------------------------------------------------------------------------------------------- finetune
    ("finetune-task-missing", ["finetune", "tiny-bert", "--task", "{d}/nope.csv", "--out", OUT], "does not exist"),
    ("finetune-task-mis-columned", ["finetune", "tiny-bert", "--task", "{d}/miscol.csv", "--out", OUT],
     "no column 'text'"),
    ("finetune-lora-rank-zero", ["finetune", "tiny-bert", "--lora-rank", "0", "--out", OUT], "lora_rank"),
    ("finetune-kd-alpha-high", ["finetune", "tiny-bert", "--kd-alpha", "2", "--out", OUT], "kd_alpha"),
    ("finetune-lr-negative", ["finetune", "tiny-bert", "--lr", "-1", "--out", OUT], "lr"),
    ("finetune-unknown-task-type", ["finetune", "tiny-bert", "--task-type", "foo", "--out", OUT], "foo"),
    ("finetune-teacher-missing", ["finetune", "tiny-bert", "--task", "{d}/task.csv", "--teacher", "{d}/noteacher",
                                  "--out", OUT], "noteacher"),
    ("finetune-mix-high", ["finetune", "tiny-bert", "--mix", "1.5", "--out", OUT], "mix"),
    ("finetune-epochs-zero", ["finetune", "tiny-bert", "--epochs", "0", "--out", OUT], "epochs"),
    ("finetune-no-out", ["finetune", "tiny-bert", "--task", "{d}/task.csv"], "needs --out"),
    # ---------------------------------------------------------------------------------------------- payt
    ("payt-sparsity-one", ["payt", "tiny-bert", "--sparsity", "1", "--out", OUT], "sparsity"),
    ("payt-unknown-schedule", ["payt", "tiny-bert", "--schedule", "foo", "--out", OUT], "foo"),
    ("payt-start-high", ["payt", "tiny-bert", "--start", "1.5", "--out", OUT], "start"),
    ("payt-every-steps-zero", ["payt", "tiny-bert", "--every-steps", "0", "--out", OUT], "--every-steps"),
    ("payt-unknown-criterion", ["payt", "tiny-bert", "--criterion", "foo", "--out", OUT], "foo"),
    ("payt-end-zero", ["payt", "tiny-bert", "--end", "0", "--out", OUT], "end"),
    ("payt-task-missing", ["payt", "tiny-bert", "--task", "{d}/nope.csv", "--out", OUT], "does not exist"),
    # ---------------------------------------------------------------------------------------------- losparse
    ("losparse-rank-ratio-zero", ["losparse", "tiny-bert", "--rank-ratio", "0", "--out", OUT], "rank"),
    ("losparse-keep-high", ["losparse", "tiny-bert", "--keep", "1.5", "--out", OUT], "keep"),
    ("losparse-unknown-structured", ["losparse", "tiny-bert", "--structured-method", "foo", "--out", OUT], "foo"),
    ("losparse-kd-without-teacher", ["losparse", "tiny-bert", "--kd-weight", "1", "--out", OUT], "need a teacher"),
    ("losparse-beta-high", ["losparse", "tiny-bert", "--beta1", "1.5", "--out", OUT], "beta1"),
    ("losparse-task-mis-columned", ["losparse", "tiny-bert", "--task", "{d}/miscol.csv", "--out", OUT],
     "no column 'text'"),
    # ---------------------------------------------------------------------------------------------- compose
    ("compose-linear-criterion-sparsegpt", ["compose", "tiny-bert", "--task", "{d}/task.csv", "--linear-criterion",
                                            "sparsegpt", "--attention", "0.25", "--linear", "0.3", "--out", OUT],
     "unsupported linear criterion 'sparsegpt'"),
    ("compose-attention-high", ["compose", "tiny-bert", "--attention", "1.5", "--out", OUT], "1.5"),
    ("compose-n-mismatch", ["compose", "tiny-bert", "--attention", "0.25", "0.5", "--linear", "0.3", "0.5",
                            "-n", "3", "--out", OUT], "3"),
    ("compose-unknown-unit", ["compose", "tiny-bert", "--attention-unit", "foo", "--out", OUT], "foo"),
    ("compose-unknown-attention-criterion", ["compose", "tiny-bert", "--attention-criterion", "foo",
                                             "--out", OUT], "foo"),
    ("compose-task-missing", ["compose", "tiny-bert", "--task", "{d}/nope.csv", "--out", OUT], "does not exist"),
    # ---------------------------------------------------------------------------------------------- run
    ("run-unknown-preset", ["run", "no-such-preset", "--out", OUT], "neither a preset"),
    ("run-malformed-yaml", ["run", "{d}/malformed.yaml", "--out", OUT], "not valid YAML"),
    ("run-unknown-key", ["run", "{d}/unknown_key.yaml", "--out", OUT], "unknown key 'bogus'"),
    ("run-set-out-of-range", ["run", "quickstart", "--set", "prune.sparsity=2", "--out", OUT], "sparsity"),
    ("run-set-malformed", ["run", "quickstart", "--set", "prune.sparsity", "--out", OUT], "key=value"),
    ("run-resume-without-out", ["run", "quickstart", "--resume"], "needs --out"),
    ("run-empty-recipe", ["run", "{d}/empty.yaml", "--out", OUT], "is empty"),
    ("run-no-stages", ["run", "{d}/no_stages.yaml", "--out", OUT], "stages"),
    ("run-list-recipe", ["run", "{d}/list.yaml", "--out", OUT], "mapping"),
    ("run-unknown-stage", ["run", "{d}/unknown_stage.yaml", "--out", OUT], "foo"),
    ("run-stage-name-path", ["run", "{d}/evil_name.yaml", "--out", OUT], "not a plain name"),
    # ---------------------------------------------------------------------------------------------- recipes
    ("recipes-unknown-option", ["recipes", "--foo"], "No such option"),
    ("recipes-extra-argument", ["recipes", "quickstart"], "unexpected extra argument"),
    # ---------------------------------------------------------------------------------------------- compare
    ("compare-missing-dir", ["compare", "{d}/nowhere", "--out", OUT], "not a prunetune run directory"),
    ("compare-not-a-run", ["compare", "{d}/nonempty", "--out", OUT], "not a prunetune run directory"),
    ("compare-no-out", ["compare", "{d}/run_no_export"], "Missing option '--out'"),
    ("compare-out-is-file", ["compare", "{prev}", "--out", "{d}/ok.txt"], "ok.txt"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """One directory of bad inputs, built once."""
    from prunetune.models.loading import load_model

    d = tmp_path_factory.mktemp("bad")
    (d / "ok.txt").write_text("Some words for a small text file.\n" * 40)
    (d / "empty.txt").write_text("")
    labelled_csv(d / "task.csv", ["sport", "tech"] * 20, seed=0)
    (d / "miscol.csv").write_text("a,b\n" + "".join(f"t{i},{i % 2}\n" for i in range(40)))
    (d / "corrupt.jsonl").write_text('{"text": "a", "label": "x"}\n{not json\n')
    (d / "garbage.gguf").write_bytes(b"GGUF" + b"\x07" * 64)
    tiny = load_model("tiny-llama")
    for name in ("corrupt_st", "no_tokenizer"):
        tiny.model.save_pretrained(d / name)
    tiny.tokenizer.save_pretrained(d / "corrupt_st")
    (d / "corrupt_st" / "model.safetensors").write_bytes(b"\x00\x01garbage" * 8)
    (d / "nonempty").mkdir()
    (d / "nonempty" / "notes.txt").write_text("mine")
    (d / "run_no_export").mkdir()
    (d / "run_no_export" / "recipe.yaml").write_text("name: t\nstages: [evaluate]\n")
    (d / "run_no_export" / "manifest.json").write_text("{}")
    (d / "malformed.yaml").write_text("name: [unclosed\nstages: [export\n")
    (d / "unknown_key.yaml").write_text("name: t\nbogus: 1\nstages: [export]\n")
    (d / "empty.yaml").write_text("")
    (d / "no_stages.yaml").write_text("name: t\nstages: []\n")
    (d / "list.yaml").write_text("- export\n- evaluate\n")
    (d / "unknown_stage.yaml").write_text("name: t\nstages: [foo]\n")
    (d / "evil_name.yaml").write_text("name: t\nstages: [{type: export, name: ../../escape}]\n")
    return d


@pytest.fixture(scope="module")
def previous(tmp_path_factory) -> Path:
    """A previous complete run (`prune tiny-llama --method magnitude`): bad commands aimed at it leave it as is."""
    import io
    from contextlib import redirect_stdout

    from prunetune.cli import main

    out = tmp_path_factory.mktemp("prev") / "run"
    with redirect_stdout(io.StringIO()):
        main(["prune", "tiny-llama", "--method", "magnitude", "--out", str(out)])
    return out


#: rows whose mistake can only show once the model is read, which the first stage does
AFTER_START = {"prune-nm-indivisible",  # the widths N:M must divide are the model's
               "prune-gguf-not-a-model", "prune-corrupt-safetensors", "shrink-encoder-hidden"}


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(d.rglob("*")) if p.is_file()} | {"<dirs>": sorted(str(p) for p in d.rglob("*"))}


def _check(argv: list[str], capfd, needle: str | None) -> str:
    code, out, err = run_cli(argv, capfd)
    assert code == 2, (argv, code, out[-2000:], err[-2000:])
    assert "Traceback" not in out + err, err
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 3 and lines[0].startswith("prunetune: error: "), err
    if needle is not None:
        assert needle in err, (needle, err)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, files, previous, tmp_path, capfd, monkeypatch):
    _, argv, needle = case
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an unknown name must not wait on the network
    fresh = tmp_path / "fresh" / "out"
    fill = {"d": str(files), "prev": str(previous)}
    printed = _check([a.replace(OUT, str(fresh)).format(**fill) for a in argv], capfd, needle)
    assert not (tmp_path / "fresh").exists(), "a failed command left its --out behind"
    # refused before any work: no stage started (loading a model that turns out corrupt is the only exception)
    assert "[1/" not in printed or case[0] in AFTER_START, printed
    if OUT in argv:  # the same mistake aimed at a previous complete run leaves every byte of it as it was
        before = _snapshot(previous)
        _check([a.replace(OUT, str(previous)).format(**fill) for a in argv], capfd, None)
        assert _snapshot(previous) == before


def test_table_covers_every_command():
    per = {c: sum(1 for case in CASES if case[1] and case[1][0] == c) for c in COMMANDS}
    assert all(per.values()), per
    assert sum(per.values()) == len(CASES) >= 60
    print(json.dumps(per))
