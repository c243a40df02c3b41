"""Prune-As-You-Tune: exact sparsity per layer, masks saved, export keeps predictions and zeros, CLI.

The two-process (DDP) PAYT run is in test_distributed.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import cli_error, cli_ok
from prunetune.methods.payt import PaytSpec, compute_masks, run_payt
from prunetune.pruning.masks import MaskSet, sparsity_report
from prunetune.tuning.config import TuneConfig


def _cfg(**kw) -> TuneConfig:
    base = dict(task="seq-cls", n_samples=16, eval_samples=8, test_samples=40, epochs=2, batch_size=8,
                max_length=32, retention=False, kd=True)
    base.update(kw)
    return TuneConfig(**base)


def test_compute_masks_is_exact_and_monotone(tiny_llama):
    model = tiny_llama.model
    m1 = compute_masks(model, "l1-global", 0.3)
    total = sum(m.numel() for m in m1.masks.values())
    assert total - sum(int(m.sum()) for m in m1.masks.values()) == int(0.3 * total)
    m1.apply(model)
    m2 = compute_masks(model, "L1Unstructured", 0.6, previous=m1)
    for name in m1.names():
        assert not bool((m2[name] & ~m1[name]).any()), "a weight pruned earlier came back"
    pytest.importorskip("prunetune.pruning.api")  # Wanda comes from the pruning engine
    from prunetune.data.sources import load_text
    from prunetune.tuning.lora import apply_lora

    peft = apply_lora(model, "causal-lm", rank=2, alpha=4)
    text = load_text("wikitext2", "valid").text[:100_000]
    w = compute_masks(peft, "wanda", 0.7, previous=m2, tokenizer=tiny_llama.tokenizer, calib_text=text, nsamples=2,
                      seqlen=64)
    assert set(w.names()) == set(m1.names())  # plain-model names, no peft ".base_layer"
    assert all(not bool((w[n] & ~m2[n]).any()) for n in w.names()) and w.sparsity() >= 0.6
    cols = compute_masks(model, "LnStructured", 0.5)
    for name, m in cols.items():
        dead_cols = (~m.any(dim=0)).sum()
        assert int(dead_cols) == m.shape[1] // 2 and 1 - m.float().mean() == 0.5


@pytest.mark.parametrize("criterion", ["l2-cols", "l1-global"])
def test_payt_reaches_target_in_real_zeros(tmp_path, criterion):
    spec = PaytSpec(sparsity=0.5, schedule="agp", start=0.2, every=1, unit="step", criterion=criterion)
    r = run_payt("tiny-llama", _cfg(lora=True, mix=__import__("prunetune.data.mixing", fromlist=["MixSpec"]).MixSpec(
        fraction=0.1)), spec, tmp_path / "payt")
    events = r["pruning_events"]
    # 16 + 2 mixed examples / batch 8 = 3 steps x 2 epochs; start 20% -> step floor(1.2) = 1, then every step
    assert r["global_step"] == 6 and [e["step"] for e in events] == [1, 2, 3, 4, 5]
    assert events[-1]["target"] == 0.5 and events[-1]["real_sparsity"] == pytest.approx(0.5, abs=1e-12)
    assert [e["target"] for e in events] == sorted(e["target"] for e in events)
    rep = sparsity_report(r["_model"])
    if criterion == "l2-cols":  # per-layer exact: every pruned layer has exactly the target in real zeros
        assert all(layer["sparsity"] == 0.5 for layer in rep["layers"].values())
    else:  # global: exactly floor(0.5 * total) zeros over all prunable linears
        assert rep["zeros"] == rep["numel"] // 2
    saved = MaskSet.load(tmp_path / "payt" / "model")
    assert saved.sparsity() == pytest.approx(0.5, abs=1e-12)
    ckpts = sorted((tmp_path / "payt" / "checkpoints").glob("checkpoint-*"))
    assert ckpts and all((c / "masks.safetensors").is_file() for c in ckpts)
    assert r["mixing"]["mixed"] == 2


def test_merged_export_reloads_with_plain_transformers_same_predictions(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prunetune.tuning.lora import mask_lora_updates
    from prunetune.evaluation.task import predict_classes

    spec = PaytSpec(sparsity=0.5, schedule="linear", start=0.0, every=1, unit="epoch")
    r = run_payt("tiny-llama", _cfg(lora=True), spec, tmp_path / "run")
    assert r["merge_changed_predictions"] == 0
    assert r["test_after_merge"]["accuracy"] == r["test_before_merge"]["accuracy"]
    d = tmp_path / "run" / "model"
    plain = AutoModelForSequenceClassification.from_pretrained(d).eval()
    tok = AutoTokenizer.from_pretrained(d)
    preds = predict_classes(plain, tok, [e["text"] for e in r["_test"]], 32)
    assert preds == r["predictions"]
    assert sparsity_report(plain)["sparsity"] == pytest.approx(0.5, abs=1e-12)
    # adapter export: sparse base + adapter; with the masked update it is the same model again
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "adapter" / "base")
    assert sparsity_report(base)["sparsity"] == pytest.approx(0.5, abs=1e-12)
    peft = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter" / "adapter").eval()
    mask_lora_updates(peft, MaskSet.load(tmp_path / "run" / "adapter" / "base"))
    assert predict_classes(peft, tok, [e["text"] for e in r["_test"]], 32) == preds


def test_full_evaluate_table_has_the_seeds_eight_rows(tmp_path):
    from prunetune.data.mixing import MixSpec
    from prunetune.methods.payt import full_evaluate

    res = full_evaluate("tiny-llama", _cfg(epochs=1, n_samples=8, retention=True, retention_windows=1,
                                           mix=MixSpec(fraction=0.25)),
                        PaytSpec(sparsity=0.5, start=0.0), tmp_path / "fe")
    labels = [row[0] for row in res["table"]["rows"]]
    assert labels == ["original (no tuning)", "dense full FT", "dense LoRA FT", "prune (no FT)", "prune -> full FT",
                      "prune -> LoRA FT", "PAYT", "PAYT without KD", "PAYT rsLoRA"]
    assert all(row[4] is not None and row[4] > 1 for row in res["table"]["rows"])  # perplexities, all measured
    sp = {row[0]: row[3] for row in res["table"]["rows"]}
    assert sp["dense full FT"] == 0.0 and sp["dense LoRA FT"] == 0.0
    assert all(sp[k] == pytest.approx(0.5) for k in labels if k.startswith(("prune", "PAYT")))
    kd = {row[0]: row[6] for row in res["table"]["rows"]}
    mixing = {row[0]: row[7] for row in res["table"]["rows"]}
    assert kd["PAYT"] == "yes" and kd["PAYT without KD"] == "no" and kd["prune (no FT)"] == "no"
    assert mixing["PAYT"] == "2 (25%)" and mixing["prune (no FT)"] == "no"
    assert res["runs"]["PAYT rsLoRA"]["train_loss"] != res["runs"]["PAYT"]["train_loss"]
    assert res["runs"]["prune (no FT)"]["timings"]["train_s"] == 0.0
    md = (tmp_path / "fe" / "full_evaluate.md").read_text()
    assert md.count("\n") == 11 and "macro-F1" in md and "| KD | mixing |" in md
    assert json.loads((tmp_path / "fe" / "full_evaluate.json").read_text())["runs"]["PAYT"]["sparsity"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_accepts_original_payt_option_names(tmp_path, capsys):
    out = tmp_path / "cli"
    cli_ok(["payt", "tiny-llama", "--n-samples", "8", "--num-epochs", "1", "--max-length", "32",
            "--sparsity-target", "0.4", "--pruning-schedule", "linear", "--start-pruning-epoch-ptg", "0.0",
            "--prune-every-epoch", "1", "--pruning-method", "L1Unstructured", "--use-kd", "--kd-alpha", "0.5",
            "--kd-temp", "4", "--use-lora", "--use-rs-lora", "--lora-rank", "4", "--lora-alpha", "8",
            "--lora-dropout", "0.0", "--dataset-mix-ptg", "0.1", "--dataset-mix-strategy", "old_first",
            "--dataset-sampling-strategy", "random", "--eval-samples", "4", "--test-samples", "20",
            "--no-retention", "--out", str(out)], capsys)
    m = json.loads((out / "metrics.json").read_text())
    assert abs(m["sparsity"] - 0.4) < 1e-5  # floor(0.4 * numel) zeros
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["tune"]["rslora"] is True and man["config"]["payt"]["criterion"] == "l1-global"
    assert man["config"]["tune"]["mix"]["strategy"] == "old_first" and m["mixing"]["mixed"] == 1


@pytest.mark.parametrize("args,msg", [
    (["--sparsity", "1.0"], "--sparsity (payt.sparsity): Input should be less than 1"),
    (["--start", "1"], "--start (payt.start)"),
    (["--schedule", "cosine"], "--schedule (payt.schedule): 'cosine' is not allowed; choose one of"),
    (["--criterion", "random"], "--criterion (payt.criterion): 'random' is not allowed; choose one of"),
    (["--kd-alpha", "2"], "--kd-alpha"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, args, msg):
    cli_error(["payt", "tiny-llama", *args, "--out", str(tmp_path / "x")], capsys, needle=msg)


def test_cli_bad_task_data_is_one_line_exit_2(tmp_path, capsys):
    one = tmp_path / "one.csv"
    one.write_text("text,label\nhello world,a\nanother text,a\n")
    cli_error(["finetune", "tiny-llama", "--task", str(one), "--out", str(tmp_path / "o")], capsys,
              needle="only one class")
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n ,a\n,b\n")
    cli_error(["finetune", "tiny-llama", "--task", str(empty), "--out", str(tmp_path / "o2")], capsys,
              needle="no non-empty text")


def test_wanda_events_tokenise_the_training_text_once_and_masks_are_unchanged(tiny_llama, monkeypatch):
    """PAYT's callback cuts the calibration windows at its first event and reuses them: same masks, one tokenising."""
    from prunetune.data import calibration
    from prunetune.methods.payt import PaytCallback

    text = " ".join(f"article {i} about markets, football and elections." for i in range(400))
    import copy

    model = copy.deepcopy(tiny_llama.model)  # prune() zeroes what it prunes: each path starts from the same weights
    first = copy.deepcopy(model)
    want = [compute_masks(first, "wanda", s, tokenizer=tiny_llama.tokenizer, calib_text=text, nsamples=4, seqlen=32)
            for s in (0.3, 0.6)]
    calls = []
    real = calibration.calibration_samples
    monkeypatch.setattr(calibration, "calibration_samples", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = PaytSpec(sparsity=0.6, criterion="wanda", nsamples=4, seqlen=32)
    cb = PaytCallback(spec, MaskSet(), {"model": model}, tokenizer=tiny_llama.tokenizer, calib_text=text)
    got = []
    for s in (0.3, 0.6):
        got.append(compute_masks(model, "wanda", s, MaskSet(), tiny_llama.tokenizer, cb._calib(), 4, 32))
    assert len(calls) == 1, "the training text was tokenised more than once"
    for w, g in zip(want, got):
        assert set(w.names()) == set(g.names()) and all(torch.equal(w[n], g[n]) for n in w.names())
