"""Calibration samples: `n` windows of `seqlen` tokens from any text, chosen with a seed.

The text is tokenised once and cut into non-overlapping windows; a seeded permutation picks `n` of them.
Non-overlapping means no token is counted twice, and it makes "not enough text" a precise statement.
"""

from __future__ import annotations

import torch

from prunetune.errors import PrunetuneError


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text as one 1-D tensor (no special tokens, no truncation)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_samples(tokenizer, text: str, nsamples: int, seqlen: int, seed: int = 0,
                        source: str = "text") -> torch.Tensor:
    """[nsamples, seqlen] token ids; fails with how much text there is when it is too short."""
    if nsamples < 1 or seqlen < 2:
        raise PrunetuneError(f"calibration needs nsamples >= 1 and seqlen >= 2, got {nsamples} x {seqlen}")
    ids = tokenize_text(tokenizer, text)
    n_windows = ids.numel() // seqlen
    if n_windows < nsamples:
        raise PrunetuneError(
            f"calibration text '{source}' has {ids.numel():,} tokens = {n_windows} windows of {seqlen}; "
            f"{nsamples} x {seqlen} = {nsamples * seqlen:,} tokens are needed (lower --nsamples or --seqlen)"
        )
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_windows, generator=gen)[:nsamples]
    return windows[pick].clone()
