"""Knowledge retention: how much of the pre-trained model's general ability survives task tuning and pruning.

The task head says nothing about that, so the tuned *backbone* is put back into the original model's
pre-training head and measured on general text (WikiText-2 test; mixing uses the valid split, so no overlap):

- decoder LMs (Llama family): original LM head + tuned backbone -> causal perplexity (lower is better);
- encoders with an MLM head: original MLM head + tuned encoder -> pseudo-perplexity (lower is better);
- encoders without one (MiniLM): mean cosine similarity of mean-pooled last hidden states of the tuned and
  the original encoder on WikiText-2 sentences (higher is better; 1.0 = unchanged).

Every result names its metric, direction and protocol.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from prunetune.data.sources import TextSource, load_text
from prunetune.errors import PrunetuneError
from prunetune.evaluation.perplexity import perplexity, pseudo_perplexity
from prunetune.models.arch import get_adapter
from prunetune.models.loading import load_model

SENT_MIN_CHARS = 40


def _sentences(text: str, n: int) -> list[str]:
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if len(ln) >= SENT_MIN_CHARS and not ln.startswith("=")]
    if not lines:
        raise PrunetuneError("retention text holds no usable sentences")
    return lines[:n]


def _transplant(tuned: nn.Module, target: nn.Module) -> None:
    """Copy the tuned backbone's weights into `target`'s backbone (pooler/unused parts may differ)."""
    src = get_adapter(tuned).backbone().state_dict()
    dst_mod = get_adapter(target).backbone()
    dst = dst_mod.state_dict()
    common = {k: v for k, v in src.items() if k in dst and dst[k].shape == v.shape}
    missing = [k for k in dst if k not in common and "pooler" not in k and "rotary" not in k]
    if missing:
        raise PrunetuneError(f"tuned backbone does not fit the original model ({len(missing)} tensors missing, "
                             f"e.g. {missing[0]})")
    dst_mod.load_state_dict(common, strict=False)


@torch.no_grad()
def mean_pooled(encoder: nn.Module, tokenizer, texts: list[str], max_length: int, batch_size: int = 16) -> torch.Tensor:
    device = next(encoder.parameters()).device
    out = []
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(texts[s : s + batch_size], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt").to(device)
        hidden = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append((hidden * m).sum(1) / m.sum(1).clamp_min(1.0))
    return torch.cat(out)


def retention(tuned: nn.Module, original_spec: str, tokenizer, *, data_dir: str | None = None,
              max_windows: int = 8, seqlen: int = 512, n_sentences: int = 128, max_length: int = 128,
              original: dict | None = None) -> dict:
    """Retention metric for a tuned (plain, merged) model against the original `original_spec`.

    `original` (a previous result for the untuned model) is only echoed for comparison.
    """
    t0 = time.perf_counter()
    family = get_adapter(tuned).family
    src = load_text("wikitext2", "test", data_dir=data_dir)
    was = tuned.training
    tuned.eval()
    try:
        if family == "llama":
            lm = load_model(original_spec, "causal-lm").model
            _transplant(tuned, lm)
            r = perplexity(lm, tokenizer, src, seqlen=seqlen, max_windows=max_windows, progress=False)
            result = {"metric": "wikitext2 perplexity (original LM head + tuned backbone)", "value": r["value"],
                      "higher_is_better": False, "protocol": r["protocol"]}
        elif family == "bert":
            texts = _sentences(src.text, n_sentences)
            try:
                mlm = load_model(original_spec, "masked-lm").model
            except PrunetuneError:
                mlm = None
            if mlm is not None:
                _transplant(tuned, mlm)
                scored = texts[: max(1, n_sentences // 4)]
                r = pseudo_perplexity(mlm, tokenizer, TextSource("\n".join(scored), src.name, src.variant),
                                      max_sentences=None, max_length=64, progress=False)
                result = {"metric": "wikitext2 MLM pseudo-perplexity (original MLM head + tuned encoder)",
                          "value": r["value"], "higher_is_better": False,
                          "protocol": {"dataset": src.name, "variant": src.variant, "sentences": len(scored),
                                       "min_chars": SENT_MIN_CHARS, "max_length": 64,
                                       "masked_tokens": r["protocol"]["scored_tokens"],
                                       "reduction": r["protocol"]["reduction"]}}
            else:
                base = load_model(original_spec, "base").model.eval()
                a = mean_pooled(get_adapter(tuned).backbone(), tokenizer, texts, max_length)
                b = mean_pooled(base.to(a.device), tokenizer, texts, max_length)
                cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
                result = {"metric": "mean cosine similarity of mean-pooled embeddings to the original encoder",
                          "value": float(cos.mean()), "higher_is_better": True,
                          "protocol": {"dataset": src.name, "variant": src.variant, "sentences": len(texts),
                                       "min_chars": SENT_MIN_CHARS, "max_length": max_length,
                                       "pooling": "mean over attention mask, last hidden state",
                                       "min": float(cos.min())}}
        else:
            raise PrunetuneError(f"no retention metric for family '{family}' yet (supported: llama, bert)")
    finally:
        tuned.train(was)
    result["seconds"] = time.perf_counter() - t0
    if original is not None:
        result["original_value"] = original.get("value")
    return result
