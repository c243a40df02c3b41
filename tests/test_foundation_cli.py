"""`prunetune eval` and `prunetune info` end to end on tiny models: the numbers they print are the library's."""

from __future__ import annotations

import json

import pytest

from cli_helpers import cli_ok
from prunetune.data.sources import load_labelled, load_text
from prunetune.data.tasks import split_labelled
from prunetune.evaluation.perplexity import perplexity
from prunetune.evaluation.task import evaluate_classification
from prunetune.models.loading import load_model

LABELS = ("arts", "sport", "tech")


@pytest.fixture()
def data(tmp_path):
    (tmp_path / "text.txt").write_text("Pruning keeps the weights that matter most.\nAnother line here.\n" * 30)
    rows = "".join(f'"{LABELS[i % 3]} news item {i}: {"word " * (i % 7)}",{LABELS[i % 3]}\n' for i in range(90))
    (tmp_path / "task.csv").write_text("text,label\n" + rows)
    return tmp_path


def test_eval_ppl_and_speed_json(data, capsys):
    out = data / "r.json"
    printed = cli_ok(["eval", "tiny-llama", "--ppl", str(data / "text.txt"), "--seqlen", "64", "--max-windows", "5",
                      "--batch-size", "2", "--speed", "--speed-seqlen", "16", "--speed-batch", "2", "--repeats", "2",
                      "--json", str(out)], capsys)
    assert "perplexity text.txt (5 x 64 tok)" in printed and "latency batch 2 x 16 tok" in printed
    man = json.loads(out.read_text())
    assert man["kind"] == "eval" and man["config"]["max_windows"] == 5 and "versions" in man
    loaded = load_model("tiny-llama")
    want = perplexity(loaded.model, loaded.tokenizer, load_text(str(data / "text.txt")), seqlen=64, max_windows=5)
    assert man["metrics"]["perplexity"]["value"] == pytest.approx(want["value"], rel=1e-6)
    assert man["metrics"]["perplexity"]["protocol"]["windows"] == 5
    sp = man["metrics"]["speed"]
    assert sp["generate"]["tokens_per_s"] > 0 and sp["protocol"]["seqlen"] == 16 and sp["size_on_disk"] is None


def test_eval_task_and_pppl_on_tiny_bert(data, capsys):
    out = data / "r.json"
    printed = cli_ok(["eval", "tiny-bert", "--task", str(data / "task.csv"), "--pppl", str(data / "text.txt"),
                      "--max-sentences", "3", "--max-length", "32", "--json", str(out)], capsys)
    assert "accuracy (task.csv/test, n=9)" in printed and "untrained" in printed
    m = json.loads(out.read_text())["metrics"]
    c = m["classification"]
    assert c["n"] == 9 and c["protocol"]["labels"] == list(LABELS) and c["protocol"]["split_seed"] == 0
    assert c["protocol"]["head"].startswith("new")
    assert m["pseudo_perplexity"]["protocol"]["sentences"] == 3 and m["pseudo_perplexity"]["value"] > 1


def test_trained_classifier_dir_info_and_eval(data, capsys):
    """A saved seq-cls checkpoint keeps its head in `info` and `eval --task`, on the fixed seeded test split."""
    clf = load_model("tiny-llama", "seq-cls", label_names=list(LABELS))
    d = data / "clf"
    clf.model.save_pretrained(d)
    clf.tokenizer.save_pretrained(d)

    cli_ok(["info", str(d), "--no-layers", "--json", str(data / "info.json")], capsys)
    info = json.loads((data / "info.json").read_text())
    assert info["task"] == "seq-cls" and info["class"] == "LlamaForSequenceClassification"
    assert info["labels"] == list(LABELS) and info["heads"] == 4 and info["kv_heads"] == 2
    assert info["size_on_disk"]["format"] == "safetensors" and info["size_on_disk"]["bytes"] > 4 * info["parameters"]

    cli_ok(["eval", str(d), "--task", str(data / "task.csv"), "--json", str(data / "e.json")], capsys)
    c = json.loads((data / "e.json").read_text())["metrics"]["classification"]
    assert c["protocol"]["head"] == "trained (from checkpoint)"
    test = split_labelled(load_labelled(str(data / "task.csv")), seed=0)["test"]
    want = evaluate_classification(clf.model, clf.tokenizer, test, max_length=128, batch_size=4)
    assert c["predictions"] == want["predictions"] and c["accuracy"] == pytest.approx(want["accuracy"])


@pytest.mark.parametrize("alias,family", [("tiny-llama", "llama"), ("tiny-bert", "bert"), ("tiny-t5", "t5")])
def test_info_tiny_aliases(alias, family, tmp_path, capsys):
    printed = cli_ok(["info", alias, "--json", str(tmp_path / "i.json")], capsys)
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["family"] == family and info["parameters"] >= info["nonzero_parameters"] > 0
    assert len(info["layers"]) == {"llama": 14, "bert": 12, "t5": 32}[family]
    assert "per-layer sparsity" in printed
