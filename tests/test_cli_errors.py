"""Bad input ends as exactly one readable line on stderr and exit code 2, never a traceback (issue 3, item 9)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cli_helpers import cli_error

TEXT = "Some words for a small text file.\n" * 40  # 1,360 bytes: enough for tiny windows, short of 2,048


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "ok.txt").write_text(TEXT)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header_only.csv").write_text("text,label\n")
    (tmp_path / "one_class.csv").write_text("text,label\na,x\nb,x\n")
    (tmp_path / "short.txt").write_text("too short")
    bad = tmp_path / "corrupt_model"
    bad.mkdir()
    (bad / "config.json").write_text("this is { not json")
    (tmp_path / "no_config").mkdir()
    (tmp_path / "no_config" / "model.safetensors").write_bytes(b"\0" * 16)
    return tmp_path


CASES = {
    # unknown alias / path
    "unknown-path": (["info", "{d}/missing_model"], "neither a model directory nor a .gguf"),
    "unknown-hub-id": (["eval", "no-such-org-xyz/no-model", "--speed"], "not a known alias"),
    "missing-gguf": (["info", "{d}/model.gguf"], "does not exist"),
    # unreadable / corrupt model dir
    "corrupt-config": (["info", "{d}/corrupt_model"], "cannot read a model config"),
    "corrupt-config-eval": (["eval", "{d}/corrupt_model", "--ppl", "{d}/ok.txt"], "cannot read a model config"),
    "dir-without-config": (["eval", "{d}/no_config", "--speed"], "without config.json"),
    # dataset path missing or empty
    "ppl-file-missing": (["eval", "tiny-llama", "--ppl", "{d}/nope.txt"], "does not exist"),
    "task-file-missing": (["eval", "tiny-bert", "--task", "{d}/nope.csv"], "does not exist"),
    "ppl-file-empty": (["eval", "tiny-llama", "--ppl", "{d}/empty.txt"], "is empty"),
    "task-file-empty": (["eval", "tiny-bert", "--task", "{d}/empty.csv"], "is empty"),
    "task-no-rows": (["eval", "tiny-bert", "--task", "{d}/header_only.csv"], "holds no examples"),
    "task-one-class": (["eval", "tiny-bert", "--task", "{d}/one_class.csv"], "only one class"),
    "task-bad-column": (["eval", "tiny-bert", "--task", "{d}/one_class.csv", "--label-column", "y"], "no column 'y'"),
    "data-dir-missing": (["eval", "tiny-llama", "--ppl", "wikitext2", "--data-dir", "{d}/nowhere"], "no WikiText-2 'test'"),
    # text too short for one window
    "text-too-short": (["eval", "tiny-llama", "--ppl", "{d}/short.txt", "--seqlen", "512"], "fewer than one window of 512"),
    "text-too-short-default": (["eval", "tiny-llama", "--ppl", "{d}/ok.txt", "--seqlen", "2048"], "fewer than one window"),
    # bad option values
    "max-windows-zero": (["eval", "tiny-llama", "--ppl", "{d}/ok.txt", "--max-windows", "0"], "--max-windows"),
    "seqlen-one": (["eval", "tiny-llama", "--ppl", "{d}/ok.txt", "--seqlen", "1"], "--seqlen"),
    "batch-not-int": (["eval", "tiny-llama", "--ppl", "{d}/ok.txt", "--batch-size", "many"], "--batch-size"),
    "bad-split": (["eval", "tiny-llama", "--ppl", "wikitext2", "--split", "dev"], "unknown WikiText-2 split 'dev'"),
    "nothing-to-eval": (["eval", "tiny-llama"], "nothing to evaluate"),
    "unknown-option": (["eval", "tiny-llama", "--perplexity", "x"], "No such option"),
    "pppl-no-mask-head": (["eval", "tiny-llama", "--pppl", "{d}/ok.txt"], "not available"),
    "wrong-classifier-labels": (["eval", "{d}/clf", "--task", "{d}/three.csv"], "2 labels but the task data has 3"),
    "ppl-on-encoder-dir": (["eval", "{d}/bert", "--ppl", "{d}/ok.txt", "--seqlen", "16"], "use pseudo-perplexity"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_one_line_exit_2(case, files, capfd):
    args, expect = CASES[case]
    if case == "wrong-classifier-labels":
        from prunetune.models.loading import load_model

        clf = load_model("tiny-llama", "seq-cls", label_names=["neg", "pos"])
        clf.model.save_pretrained(files / "clf")
        clf.tokenizer.save_pretrained(files / "clf")
        (files / "three.csv").write_text("text,label\n" + "".join(f"t{i},{'abc'[i % 3]}\n" for i in range(30)))
    if case == "ppl-on-encoder-dir":
        from prunetune.models.loading import load_model

        bert = load_model("tiny-bert", "masked-lm")
        bert.model.save_pretrained(files / "bert")
        bert.tokenizer.save_pretrained(files / "bert")
    cli_error([a.format(d=files) for a in args], capfd, needle=expect)


def test_console_script_one_line_exit_2(tmp_path):
    """The installed entry point itself (not only `main`) keeps the contract."""
    exe = os.path.join(os.path.dirname(sys.executable), "prunetune")
    proc = subprocess.run([exe, "eval", "tiny-llama", "--ppl", str(tmp_path / "missing.txt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"prunetune: error: data file {tmp_path / 'missing.txt'} does not exist"]


def test_error_line_is_one_write(tmp_path, monkeypatch):
    """The ranks of a multi-process launch share one stderr pipe, and a pipe write up to PIPE_BUF is atomic only
    when the line and its newline go out in one write: two writes let the ranks' lines interleave into one."""
    from prunetune.cli.main import main

    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stderr", Recorder())
    with pytest.raises(SystemExit) as stop:
        main(["eval", "tiny-llama", "--ppl", str(tmp_path / "missing.txt")])
    assert stop.value.code == 2
    assert writes == [f"prunetune: error: data file {tmp_path / 'missing.txt'} does not exist\n"]
