"""Baseline of benchmarks/lora_step.py: one plain peft LoRA training step on a 50%-pruned SmolLM2-135M.

Committed before the prunetune side of the benchmark and left unchanged since, so the reference does not
move with the code it judges. Setting (issue 17, "Mask-aware LoRA step"): SmolLM2-135M in fp32, every
linear of the seven projections (q k v o gate up down) magnitude-pruned to 50% per layer, a batch of
4 x 256 tokens of WikiText-2 valid, LoRA rank 8 / alpha 16 on all seven projections, one forward + backward
with the model's own causal-LM loss (the full-vocabulary logits, on both sides of the comparison).
"""

from __future__ import annotations

import torch
from torch import nn

BATCH, SEQLEN, RANK, ALPHA = 4, 256, 8, 16.0
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@torch.no_grad()
def pruned_smollm2(sparsity: float = 0.5) -> tuple[nn.Module, object]:
    """SmolLM2-135M with the lowest-|w| half of every target linear set to exactly zero (per layer)."""
    from prunetune.models.loading import load_model

    loaded = load_model("smollm2-135m", "causal-lm")
    model = loaded.model
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            w = mod.weight
            k = int(sparsity * w.numel())
            cut = w.abs().flatten().kthvalue(k).values
            w.masked_fill_(w.abs() <= cut, 0.0)
    return model, loaded.tokenizer


def batch(tokenizer, data_dir: str | None = None) -> torch.Tensor:
    """BATCH x SEQLEN token ids: the first tokens of WikiText-2 valid, cut into rows."""
    from prunetune.data.sources import load_text

    text = load_text("wikitext2", "valid", data_dir=data_dir).text[:200_000]
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0][: BATCH * SEQLEN]
    return ids.view(BATCH, SEQLEN)


def peft_lora(model: nn.Module, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """Plain peft LoRA (unmasked update) on the seven projections; base weights frozen."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout,
                                            target_modules=list(TARGETS), bias="none"))


def step(model: nn.Module, ids: torch.Tensor) -> float:
    """One training step's compute: forward with the model's LM loss, backward; gradients dropped after."""
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return float(loss.detach())
