"""Evaluation numbers checked against independent computations (hand values, brute-force loops, HF losses)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from prunetune.data.sources import TextSource
from prunetune.errors import PrunetuneError
from prunetune.evaluation.perplexity import perplexity, pseudo_perplexity, text_windows
from prunetune.evaluation.speed import forward_latency, size_on_disk, speed_report
from prunetune.evaluation.task import bleu, classification_metrics, evaluate_classification
from prunetune.models.loading import load_model

TEXT = (
    "The quick brown fox jumps over the lazy dog.\n"
    "Pruning removes weights; fine-tuning recovers what was lost.\n"
    "\n"
    "A third line, short.\n"
)


# ------------------------------------------------------------------------------------------ classification
def test_classification_metrics_hand_example():
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    # class 0: P=1/2 R=1/2 F1=1/2 ; class 1: P=2/3 R=1 F1=4/5 ; class 2: P=1 R=1/2 F1=2/3
    m = classification_metrics(preds, labels, num_labels=3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_classification_metrics_class_only_predicted_counts_as_zero_f1():
    m = classification_metrics([0, 1], [0, 0])
    assert m["accuracy"] == 0.5
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)


def test_classification_metrics_rejects_bad_input():
    with pytest.raises(PrunetuneError, match="3 predictions for 2 labels"):
        classification_metrics([0, 1, 1], [0, 1])
    with pytest.raises(PrunetuneError, match="outside 0..1"):
        classification_metrics([0, 2], [0, 1], num_labels=2)


def test_evaluate_classification_matches_manual_argmax():
    loaded = load_model("tiny-bert", "seq-cls", label_names=["a", "b", "c"])
    examples = [{"text": t, "label": i % 3} for i, t in enumerate(
        ["short", "a somewhat longer sentence here", "x" * 300, "mid length text", "b", "another one"])]
    r = evaluate_classification(loaded.model, loaded.tokenizer, examples, max_length=32, batch_size=4)
    manual = []
    with torch.no_grad():
        for e in examples:  # one at a time: no padding involved
            enc = loaded.tokenizer(e["text"], truncation=True, max_length=32, return_tensors="pt")
            manual.append(int(loaded.model(**enc).logits.argmax(-1)))
    assert r["predictions"] == manual
    want = classification_metrics(manual, [e["label"] for e in examples])
    assert r["accuracy"] == pytest.approx(want["accuracy"]) and r["macro_f1"] == pytest.approx(want["macro_f1"])
    assert r["protocol"]["split"] == "test" and r["protocol"]["n"] == 6 and r["protocol"]["max_length"] == 32


def test_bleu_perfect_and_partial():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"])["value"] == pytest.approx(100.0)
    r = bleu(["the cat sat on a mat today"], ["the cat sat on the mat"])
    assert 0.0 < r["value"] < 100.0 and "13a" in r["protocol"]["signature"]
    with pytest.raises(PrunetuneError):
        bleu(["a", "b"], ["a"])


# ------------------------------------------------------------------------------------------ perplexity
def test_perplexity_tiny_equals_labels_loss():
    loaded = load_model("tiny-llama", "causal-lm")
    src = TextSource(TEXT * 4, "toy", "file")
    r = perplexity(loaded.model, loaded.tokenizer, src, seqlen=32, batch_size=3)
    windows, _, _ = text_windows(loaded.tokenizer, src.text, 32)
    with torch.no_grad():
        losses = [float(loaded.model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert r["value"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert r["protocol"]["windows"] == len(windows) and r["protocol"]["predicted_tokens"] == len(windows) * 31


def test_perplexity_text_too_short():
    loaded = load_model("tiny-llama", "causal-lm")
    with pytest.raises(PrunetuneError, match="fewer than one window of 512"):
        perplexity(loaded.model, loaded.tokenizer, TextSource("tiny", "toy", "file"), seqlen=512)


@pytest.mark.slow
def test_smollm2_wikitext_ppl_matches_hf_loss(smollm2, wikitext_dir):
    """The protocol's number equals exp(mean HF `labels=` loss) over the same first 8 windows of 512."""
    from prunetune.data.sources import load_text

    src = load_text("wikitext2", "test", data_dir=str(wikitext_dir))
    r = perplexity(smollm2.model, smollm2.tokenizer, src, seqlen=512, max_windows=8, batch_size=4)
    windows, n_avail, _ = text_windows(smollm2.tokenizer, src.text, 512, 8)
    with torch.no_grad():
        losses = [float(smollm2.model(input_ids=windows[i : i + 2], labels=windows[i : i + 2]).loss)
                  for i in range(0, 8, 2)]
    ref = math.exp(sum(losses) / len(losses))  # equal token counts per pair, so the mean of means is the mean
    assert r["value"] == pytest.approx(ref, rel=1e-4)
    assert r["protocol"]["windows"] == 8 and n_avail > 500
    assert 5 < r["value"] < 60  # a working 135M LM on WikiText, not a random one (~50k)


# ------------------------------------------------------------------------------------------ pseudo-ppl
def test_pseudo_perplexity_equals_brute_force_loop():
    loaded = load_model("tiny-bert", "masked-lm")
    model, tok = loaded.model, loaded.tokenizer
    src = TextSource(TEXT, "toy", "file")
    r = pseudo_perplexity(model, tok, src, max_sentences=2, batch_size=7, max_length=40)
    nll, n = 0.0, 0
    with torch.no_grad():
        for line in [ln for ln in TEXT.splitlines() if ln.strip()][:2]:
            ids = tok(line.strip(), truncation=True, max_length=40, return_tensors="pt")["input_ids"][0]
            for i in range(1, len(ids) - 1):  # every token between [CLS] and [SEP]
                masked = ids.clone()
                masked[i] = tok.mask_token_id
                logits = model(input_ids=masked[None]).logits[0, i]
                nll -= float(F.log_softmax(logits, -1)[ids[i]])
                n += 1
    assert r["protocol"]["scored_tokens"] == n
    assert r["protocol"]["sentences_truncated"] == 2  # both lines (44, 60 bytes) exceed 40 tokens
    assert r["value"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_pseudo_perplexity_needs_mask_token():
    loaded = load_model("tiny-llama", "causal-lm")
    with pytest.raises(PrunetuneError, match="MASK"):
        pseudo_perplexity(loaded.model, loaded.tokenizer, TextSource(TEXT, "toy", "file"))


# ------------------------------------------------------------------------------------------ speed
def test_speed_report_tiny_llama(tmp_path):
    loaded = load_model("tiny-llama", "causal-lm")
    loaded.model.save_pretrained(tmp_path)
    r = speed_report(loaded.model, loaded.tokenizer, tmp_path, seqlen=16, batch_size=4, repeats=3, gen_tokens=8)
    assert r["parameters"] == sum(p.numel() for p in loaded.model.parameters())
    assert 0 < r["nonzero_parameters"] <= r["parameters"]
    assert r["size_on_disk"]["format"] == "safetensors"
    # fp32 weights on disk: 4 bytes per parameter plus a small header
    assert r["parameters"] * 4 <= r["size_on_disk"]["bytes"] < r["parameters"] * 4 + 100_000
    assert [x["batch"] for x in r["latency"]] == [1, 4]
    assert all(x["ms_median"] > 0 and len(x["ms_all"]) == 3 for x in r["latency"])
    assert r["generate"]["new_tokens"] == 8 and r["generate"]["tokens_per_s"] > 0
    p = r["protocol"]
    assert p["threads"] == torch.get_num_threads() and p["dtype"] == "float32" and p["seqlen"] == 16
    assert p["repeats"] == 3


def test_speed_encoder_and_seq2seq_have_no_generate():
    for alias in ("tiny-bert", "tiny-t5"):
        loaded = load_model(alias, "masked-lm" if alias == "tiny-bert" else "seq2seq")
        r = speed_report(loaded.model, loaded.tokenizer, None, seqlen=8, batch_size=2, repeats=1)
        assert r["generate"] is None and r["size_on_disk"] is None and r["latency"][1]["ms_median"] > 0


def test_speed_rejects_bad_setup(tmp_path):
    loaded = load_model("tiny-llama", "causal-lm")
    with pytest.raises(PrunetuneError):
        forward_latency(loaded.model, batch=0)
    with pytest.raises(PrunetuneError, match="no weight files"):
        size_on_disk(tmp_path)
