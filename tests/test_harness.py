"""lm-eval bridge, offline: the shipped bbc_news_topic task on tiny-llama, checked against a hand computation."""

from __future__ import annotations

import pytest
import torch

from prunetune.errors import PrunetuneError
from prunetune.evaluation.harness import harness_evaluate, local_tasks

LIMIT = 4
CHOICES = ["business", "entertainment", "politics", "sport", "technology"]


@pytest.fixture(scope="module")
def tiny():
    from prunetune.models.loading import load_model

    return load_model("tiny-llama", "causal-lm")


@pytest.fixture(scope="module")
def result(tiny):
    return harness_evaluate(tiny.model, tiny.tokenizer, "bbc_news_topic", limit=LIMIT)


@torch.no_grad()
def _hand_accuracy(loaded, n: int) -> float:
    """argmax over choices of sum log p(' choice' | prompt), scored directly with the model (byte tokens)."""
    import importlib.util
    from pathlib import Path

    from prunetune.evaluation import harness

    spec = importlib.util.spec_from_file_location("bbc_utils", Path(harness.LOCAL_TASKS_DIR) / "bbc_news_topic" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    docs = utils.load_docs()["test"]
    tok, model = loaded.tokenizer, loaded.model
    correct = 0
    for doc in list(docs)[:n]:
        ctx = f"Article: {doc['text']}\nTopic of the article (business, entertainment, politics, sport or technology):"
        ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
        scores = []
        for c in CHOICES:
            cont = tok(" " + c, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx_ids + cont])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            scores.append(sum(float(logp[len(ctx_ids) - 1 + i, t]) for i, t in enumerate(cont)))
        correct += int(max(range(len(CHOICES)), key=lambda i: scores[i]) == doc["label"])
    return correct / n


def test_local_task_shipped():
    assert "bbc_news_topic" in local_tasks()


def test_accuracy_in_range_with_protocol_and_matches_hand_computation(tiny, result):
    r = result["bbc_news_topic"]
    assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["acc_norm"] <= 1.0
    assert r["acc"] * LIMIT == pytest.approx(round(r["acc"] * LIMIT))  # a count of documents
    p = r["protocol"]
    assert p["documents"] == LIMIT and p["local"] is True and p["num_fewshot"] == 0
    assert r["acc"] == pytest.approx(_hand_accuracy(tiny, LIMIT))


def test_deterministic(tiny, result):
    again = harness_evaluate(tiny.model, tiny.tokenizer, ["bbc_news_topic"], limit=LIMIT)
    assert again["bbc_news_topic"]["acc"] == result["bbc_news_topic"]["acc"]
    assert again["bbc_news_topic"]["acc_norm"] == result["bbc_news_topic"]["acc_norm"]


def test_unknown_task_is_one_line(tiny):
    with pytest.raises(PrunetuneError, match="unknown lm-eval task.*no_such_task.*local tasks: bbc_news_topic"):
        harness_evaluate(tiny.model, tiny.tokenizer, "no_such_task", limit=1)
    with pytest.raises(PrunetuneError, match="at least one task"):
        harness_evaluate(tiny.model, tiny.tokenizer, " , ", limit=1)
