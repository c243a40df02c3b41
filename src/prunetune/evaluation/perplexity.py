"""Causal perplexity with its protocol recorded, and MLM pseudo-perplexity for encoders.

Protocol (DESIGN.md): the text is tokenised once, cut into non-overlapping windows of `seqlen` tokens (the
tail shorter than a window is dropped), each window is scored independently, and perplexity is
exp(total NLL / number of predicted tokens), a window predicting `seqlen - 1` tokens. This equals the mean
of the per-window `labels=` losses of a transformers model, which the tests check.

The LM head is applied in chunks of tokens: full-vocab fp32 logits for a batch of 8 x 512 SmolLM2 windows
would be 800 MB; chunking keeps memory flat at no cost in accuracy.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from prunetune.data.calibration import tokenize_text
from prunetune.data.sources import TextSource
from prunetune.errors import PrunetuneError
from prunetune.progress import track

LOGIT_CHUNK = 2048  # tokens per LM-head chunk


def text_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None, source: str = "text"):
    ids = tokenize_text(tokenizer, text)
    n = ids.numel() // seqlen
    if n < 1:
        raise PrunetuneError(f"text '{source}' has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        if max_windows < 1:
            raise PrunetuneError(f"--max-windows must be >= 1, got {max_windows}")
        n_used = min(n, max_windows)
    else:
        n_used = n
    return ids[: n_used * seqlen].view(n_used, seqlen), n, ids.numel()


def _chunked_nll(model, input_ids: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token NLL over a batch, computing logits a chunk of tokens at a time."""
    head = model.get_output_embeddings()
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else None
    if head is None or backbone is None or getattr(model.config, "final_logit_softcapping", None):
        logits = model(input_ids=input_ids).logits
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="sum")
        return float(nll), input_ids[:, 1:].numel()
    hidden = backbone(input_ids=input_ids).last_hidden_state[:, :-1].flatten(0, 1)
    targets = input_ids[:, 1:].flatten()
    total = 0.0
    for s in range(0, hidden.shape[0], LOGIT_CHUNK):
        logits = head(hidden[s : s + LOGIT_CHUNK]).float()
        total += float(F.cross_entropy(logits, targets[s : s + LOGIT_CHUNK], reduction="sum"))
    return total, targets.numel()


@torch.no_grad()
def perplexity(model, tokenizer, source: TextSource, seqlen: int = 512, max_windows: int | None = None,
               batch_size: int = 4, device: str | torch.device | None = None, progress: bool | None = None) -> dict:
    """Perplexity of a causal LM on `source` with the protocol in the module docstring, recorded in the result."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise PrunetuneError("causal perplexity needs a decoder-only model; use a seq2seq metric for T5")
    if seqlen < 2:
        raise PrunetuneError(f"--seqlen must be >= 2, got {seqlen}")
    windows, n_avail, n_tokens = text_windows(tokenizer, source.text, seqlen, max_windows, source.name)
    device = torch.device(device) if device else next(model.parameters()).device
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    nll, count = 0.0, 0
    batches = range(0, windows.shape[0], batch_size)
    for s in track(batches, f"ppl {source.name}", total=len(batches), show=progress):
        n, c = _chunked_nll(model, windows[s : s + batch_size].to(device))
        nll += n
        count += c
    model.train(was_training)
    ppl = math.exp(nll / count)
    return {
        "metric": "perplexity",
        "value": ppl,
        "nll": nll / count,
        "seconds": time.perf_counter() - t0,
        "protocol": {
            "dataset": source.name,
            "variant": source.variant,
            "seqlen": seqlen,
            "stride": seqlen,
            "windows": int(windows.shape[0]),
            "windows_available": int(n_avail),
            "tokens_in_text": int(n_tokens),
            "predicted_tokens": int(count),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "joined_with": "\\n",
            "reduction": "exp(mean NLL over predicted tokens); non-overlapping windows, tail dropped",
        },
    }
