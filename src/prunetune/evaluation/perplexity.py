"""Causal perplexity with its protocol recorded, and MLM pseudo-perplexity for encoders.

Protocol (DESIGN.md): the text is tokenised once, cut into non-overlapping windows of `seqlen` tokens (the
tail shorter than a window is dropped), each window is scored independently, and perplexity is
exp(total NLL / number of predicted tokens), a window predicting `seqlen - 1` tokens. This equals the mean
of the per-window `labels=` losses of a transformers model, which the tests check.

The LM head is applied in chunks of tokens: full-vocab fp32 logits for a batch of 8 x 512 SmolLM2 windows
would be 800 MB; chunking keeps memory flat at no cost in accuracy. Training's causal-LM loss
(`causal_lm_loss`, used by `tuning`) is the same code with gradients.
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

LOGIT_CHUNK = 256  # tokens per LM-head chunk: 48 MB of SmolLM2 fp32 logits (2048: 400 MB with the log-softmax)
IGNORE_INDEX = -100  # label of positions that are not predicted (padding), as in transformers


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


def lm_head_split(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(backbone, head) when the logits are exactly head(backbone(...).last_hidden_state), else None.

    Models that post-process logits (soft-capping, a logit scale) keep the plain full-logits path.
    """
    head = model.get_output_embeddings()
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else None
    cfg = model.config
    if (head is None or backbone is None or not isinstance(head, torch.nn.Linear)
            or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None)
            or getattr(cfg, "logits_scaling", None)):
        return None
    return backbone, head


class _ChunkedNLL(torch.autograd.Function):
    """Sum of next-token NLL of `head(hidden)` over the valid targets, a chunk of tokens at a time, with the
    gradients (hidden, head weight and bias) computed chunk by chunk in the forward pass.

    Autograd through chunked logits would still keep every chunk's log-probabilities until backward (the
    full-vocabulary tensor again); here a chunk's softmax becomes its gradient at once and is dropped, so
    only (tokens x hidden) is kept. The gradient costs no extra product: softmax - one-hot times the head
    weight, which backward would have computed anyway.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.zeros_like(hidden) if need_h else None
        gw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        gb = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s : s + chunk], targets[s : s + chunk]
            valid = t != IGNORE_INDEX
            if not bool(valid.any()):
                continue
            logp = F.log_softmax(F.linear(h, weight, bias).float(), dim=-1)
            rows = torch.arange(t.shape[0], device=t.device)[valid]
            tv = t[valid]
            total += -logp[rows, tv].sum(dtype=torch.float64)
            g = logp.exp_()  # d(sum NLL)/d logits = softmax - one-hot, on valid rows only
            g[rows, tv] -= 1.0
            g[~valid] = 0.0
            if need_h:
                gh[s : s + chunk] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                gw.addmm_(g.t(), h.float())
            if need_b:
                gb += g.sum(0)
            del logp, g
        ctx.save_for_backward(*(x for x in (gh, gw, gb) if x is not None))
        ctx.have, ctx.weight_dtype = (need_h, need_w, need_b), weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        out = [next(saved) * grad.to(torch.float32) if have else None for have in ctx.have]
        gh, gw, gb = out
        if gw is not None:
            gw = gw.to(ctx.weight_dtype)
        return gh, gw, gb, None, None


def chunked_nll_sum(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor,
                    chunk: int = LOGIT_CHUNK) -> torch.Tensor:
    """Sum (float64) of the NLL of `targets` (ignore -100) under `head(hidden)`, never materialising all the logits.

    Differentiable when grad mode is on and an input requires grad (training); otherwise a plain chunked
    loop, the perplexity evaluation's.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    bias = head.bias
    if torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _ChunkedNLL.apply(hidden, head.weight, bias, targets, chunk)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk):
        logits = head(hidden[s : s + chunk]).float()
        total += F.cross_entropy(logits, targets[s : s + chunk], ignore_index=IGNORE_INDEX, reduction="sum")
    return total


def causal_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor | None = None, reduction: str = "mean",
                   chunk: int = LOGIT_CHUNK, **features) -> tuple[torch.Tensor, int]:
    """Next-token NLL of a causal LM (labels shifted by one, -100 ignored): mean or sum, and the count.

    The same loss as transformers' `labels=` loss (mean over predicted tokens), computed from the last hidden
    state with the LM head applied a chunk of tokens at a time: for 2 x 256 SmolLM2 tokens the full fp32
    logits and their log-softmax and gradient are about 100 MB each; chunks of 256 tokens halve that, and
    the gradient reuses the log-softmax's memory. Models whose logits are not a plain head on the hidden state fall back to the full logits.
    `features` are the model's other inputs (attention_mask, ...).
    """
    labels = input_ids if labels is None else labels
    targets = labels[:, 1:]
    count = int((targets != IGNORE_INDEX).sum())
    split = lm_head_split(model)
    if split is None:
        logits = model(input_ids=input_ids, **features).logits
        total = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                reduction="sum")
    else:
        backbone, head = split
        hidden = backbone(input_ids=input_ids, **features).last_hidden_state[:, :-1]
        total = chunked_nll_sum(hidden, head, targets, chunk)
    if reduction == "sum":
        return total, count
    return (total / max(count, 1)).to(torch.float32), count


def _chunked_nll(model, input_ids: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token NLL over a batch, computing logits a chunk of tokens at a time."""
    total, count = causal_lm_loss(model, input_ids, reduction="sum")
    return float(total), count


@torch.no_grad()
def perplexity(model, tokenizer, source: TextSource, seqlen: int = 512, max_windows: int | None = None,
               batch_size: int = 4, device: str | torch.device | None = None, progress: bool | None = None) -> dict:
    """Perplexity of a causal LM on `source` with the protocol in the module docstring, recorded in the result."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise PrunetuneError("causal perplexity needs a decoder-only model; use a seq2seq metric for T5")
    if getattr(model.config, "model_type", None) in ("bert", "roberta", "xlm-roberta", "distilbert"):
        raise PrunetuneError("causal perplexity needs a decoder-only model; for encoders use pseudo-perplexity (--pppl)")
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


# ------------------------------------------------------------------------------------- pseudo-perplexity
def _sentences(text: str, max_sentences: int | None) -> list[str]:
    """The text's non-empty lines in order (WikiText: one paragraph or heading per line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[:max_sentences] if max_sentences is not None else lines


def _mlm_head(model):
    """(encoder, head) when the MLM head can be applied to selected hidden states only, else None.

    Scoring only the masked position needs 1 row of logits per masked copy instead of `length` rows:
    for a 30k vocabulary and 128 tokens that is the difference between 15 MB and 2 GB per batch of 128.
    """
    head = getattr(model, "cls", None) or getattr(model, "lm_head", None)
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model:
        return None
    return base, head


@torch.no_grad()
def pseudo_perplexity(model, tokenizer, source: TextSource, max_sentences: int | None = 64, batch_size: int = 32,
                      max_length: int = 128, progress: bool | None = None) -> dict:
    """MLM pseudo-perplexity (Salazar et al. 2020): mask each token of a sentence in turn, score the true token.

    Each sentence (non-empty line) is tokenised with the model's special tokens and truncated to `max_length`;
    every non-special position is masked once, the masked copies of one sentence are batched (same length, so
    no padding), and the result is exp(total NLL / number of masked positions).
    """
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise PrunetuneError("pseudo-perplexity needs a tokenizer with a [MASK] token (a masked-LM model)")
    if batch_size < 1 or max_length < 3:
        raise PrunetuneError(f"batch_size must be >= 1 and max_length >= 3, got {batch_size} and {max_length}")
    if max_sentences is not None and max_sentences < 1:
        raise PrunetuneError(f"--max-sentences must be >= 1, got {max_sentences}")
    sentences = _sentences(source.text, max_sentences)
    if not sentences:
        raise PrunetuneError(f"text '{source.name}' has no non-empty line to score")
    device = next(model.parameters()).device
    split = _mlm_head(model)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    nll, count, truncated = 0.0, 0, 0
    for sent in track(sentences, f"pseudo-ppl {source.name}", total=len(sentences), show=progress):
        enc = tokenizer(sent, truncation=True, max_length=max_length, return_special_tokens_mask=True)
        ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        truncated += int(len(tokenizer(sent)["input_ids"]) > max_length)
        positions = [i for i, sp in enumerate(enc["special_tokens_mask"]) if not sp]
        for s in range(0, len(positions), batch_size):
            pos = torch.tensor(positions[s : s + batch_size])
            batch = ids.repeat(len(pos), 1)
            rows = torch.arange(len(pos))
            batch[rows, pos] = mask_id
            batch = batch.to(device)
            extra = {"token_type_ids": torch.zeros_like(batch)} if "token_type_ids" in enc else {}
            if split is not None:
                base, head = split
                hidden = base(input_ids=batch, attention_mask=torch.ones_like(batch), **extra).last_hidden_state
                logits = head(hidden[rows.to(device), pos.to(device)])
            else:
                logits = model(input_ids=batch, attention_mask=torch.ones_like(batch), **extra).logits
                logits = logits[rows.to(device), pos.to(device)]
            nll += float(F.cross_entropy(logits.float(), ids[pos].to(device), reduction="sum"))
            count += len(pos)
    model.train(was_training)
    if count == 0:
        raise PrunetuneError(f"text '{source.name}' produced no tokens to score")
    return {
        "metric": "pseudo_perplexity",
        "value": math.exp(nll / count),
        "nll": nll / count,
        "seconds": time.perf_counter() - t0,
        "protocol": {
            "dataset": source.name,
            "variant": source.variant,
            "unit": "non-empty line",
            "sentences": len(sentences),
            "sentences_truncated": truncated,
            "max_length": max_length,
            "scored_tokens": count,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "reduction": "exp(mean NLL of each non-special token masked alone)",
        },
    }
