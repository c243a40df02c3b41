"""The GPU tier (`pytest -m gpu`): the tuning and evaluation paths put inputs and masks on the model's device.

Each test compares against the same computation on CPU, so a device bug shows as an error or a mismatch.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_lm_loss_and_predict_classes_on_cuda_match_cpu():
    from prunetune.evaluation.task import predict_classes
    from prunetune.models.loading import load_model
    from prunetune.tuning.evaluate import lm_loss

    lm = load_model("tiny-llama", "causal-lm")
    ex = [{"text": "the quick brown fox jumps over the lazy dog " * 4}, {"text": "a b c d e f g h"}]
    cpu = lm_loss(lm.model, lm.tokenizer, ex, 32)
    gpu = lm_loss(lm.model.cuda(), lm.tokenizer, ex, 32)
    assert gpu["tokens"] == cpu["tokens"] and gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-4)
    cls = load_model("tiny-llama", "seq-cls", num_labels=3)
    texts = [f"example number {i} " * (1 + i % 3) for i in range(10)]
    want = predict_classes(cls.model, cls.tokenizer, texts, 32)
    assert predict_classes(cls.model.cuda(), cls.tokenizer, texts, 32) == want


def test_mean_pooled_on_cuda_matches_cpu():
    from prunetune.evaluation.retention import mean_pooled
    from prunetune.models.loading import load_model

    bert = load_model("tiny-bert", "base")
    texts = ["a sentence long enough to be pooled over several tokens", "short one"]
    cpu = mean_pooled(bert.model, bert.tokenizer, texts, 32)
    gpu = mean_pooled(bert.model.cuda(), bert.tokenizer, texts, 32)
    assert gpu.device.type == "cuda" and torch.allclose(gpu.cpu(), cpu, atol=1e-4)


def test_masked_lora_finetune_on_cuda_keeps_zeros_and_merge_exact(tmp_path):
    from prunetune.methods.payt import PaytSpec, run_payt
    from prunetune.pruning.masks import sparsity_report
    from prunetune.tuning.spec import TuneSpec

    cfg = TuneSpec(steps=None, n_samples=16, eval_samples=8, test_samples=24, epochs=2, batch_size=8, seqlen=32,
                   retention=False, lora_dropout=0.0, kd=True)
    r = run_payt("tiny-llama", cfg, PaytSpec(sparsity=0.5, schedule="linear", start=0.0, every=1, unit="step"),
                 tmp_path / "run")
    assert next(r["_model"].parameters()).device.type == "cuda"
    assert r["merge_changed_predictions"] == 0
    assert sparsity_report(r["_model"])["zeros"] == sparsity_report(r["_model"])["numel"] // 2
