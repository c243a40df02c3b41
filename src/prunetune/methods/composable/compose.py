"""Composition: a configuration's model is the original with every trained unit swapped in, plus the MaskSet that
keeps pruned weights at zero; the data and the model-level fine-tuning's helpers.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunetune.methods.base import Method
from prunetune.methods.composable.plan import Configuration, Unit
from prunetune.methods.composable.units import UnitResults, unit_roles
from prunetune.models.arch import get_adapter
from prunetune.models.export import save_hf_dir
from prunetune.pruning.masks import MaskSet


@torch.no_grad()
def compose(model: nn.Module, units: Sequence[Unit], results: UnitResults, *, inplace: bool = False
            ) -> tuple[nn.Module, MaskSet]:
    """The configuration's model: a copy of the original with each unit's tensors swapped in, and its masks."""
    out = model if inplace else copy.deepcopy(model)
    adapter = get_adapter(out)
    blocks = {b.index: b for b in adapter.blocks()}
    masks = MaskSet()
    for u in units:
        t = results.tensors[u.id]
        block = blocks[u.block]
        for r in unit_roles(u):
            lin = block.linears[r]
            lin.weight.copy_(t[f"{r}.weight"])
            if lin.bias is not None and f"{r}.bias" in t:
                lin.bias.copy_(t[f"{r}.bias"])
            masks[adapter.name_of(lin)] = t[f"{r}.mask"]
    masks.apply(out)
    return out, masks


class ComposedStart(Method):
    """The `Method` lifecycle face of composition: `prepare` swaps one configuration's (fine-tuned or merely
    pruned) units into the model it is given and hands their masks to the run, which then keeps pruned
    weights at zero through model-level fine-tuning; `summary` says what was composed.

    For `tuning.finetune(model, ..., method=ComposedStart(...))` (a model passed in memory, no round trip
    through disk); `run_composable` saves the composed start instead while `finetune` takes paths only.
    """

    name = "composable"
    changes_base_weights = False

    def __init__(self, units: Sequence[Unit], results: UnitResults, configuration: Configuration | None = None):
        self.units, self.results, self.configuration = list(units), results, configuration
        self._masks: MaskSet | None = None

    def prepare(self, model: nn.Module, ctx: Any) -> nn.Module:
        model, masks = compose(model, self.units, self.results, inplace=True)
        self._masks = masks
        if getattr(ctx, "masks", None) is not None:
            ctx.masks.update(masks)
        return model

    def callbacks(self, ctx: Any) -> list:
        return []

    def extra_loss(self, model: nn.Module, inputs: dict, outputs: Any, ctx: Any):
        return None, {}

    def after_step(self, model: nn.Module, ctx: Any) -> None:
        return None

    def finalize(self, model: nn.Module, ctx: Any) -> nn.Module:
        return model

    def summary(self) -> dict:
        return {"units": [u.id for u in self.units], "module_finetuned": not all(
                    self.results.stats.get(u.id, {}).get("finetuned", True) is False for u in self.units),
                "sparsity_of_units": self._masks.sparsity() if self._masks is not None else None,
                "configuration": self.configuration.to_dict() if self.configuration else None}

    def to_dict(self) -> dict:
        return {"name": self.name, "units": len(self.units)}


def text_batches(tokenizer, texts: Sequence[str], max_length: int, batch_size: int,
                 targets: Sequence[str] | None = None) -> list[dict]:
    """Padded batches of the training text (with `targets`: seq2seq batches carrying labels)."""
    out = []
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[s:s + batch_size]), truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        b = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if targets is not None:
            lab = tokenizer(text_target=list(targets[s:s + batch_size]), truncation=True, max_length=max_length,
                            padding=True, return_tensors="pt")
            labels = lab["input_ids"].masked_fill(lab["attention_mask"] == 0, -100)
            b["labels"] = labels
            b["decoder_attention_mask"] = lab["attention_mask"]
        out.append(b)
    return out


def geometric_checks(max_steps: int, first: int = 2) -> list[int]:
    """Check steps 2, 4, 8, ...: a run that reaches its target early pays few checks, a late one few more."""
    out, s = [], first
    while s < max_steps:
        out.append(s)
        s *= 2
    return out + [max_steps]


def save_composed(model: nn.Module, tokenizer, masks: MaskSet, out: Path | str, info: dict | None = None) -> Path:
    """A plain HF directory with the composed weights and their masks (what `finetune` loads and keeps)."""
    return save_hf_dir(model, tokenizer, out, {"kind": "composed", **(info or {})},
                       extra=lambda tmp: masks.save(tmp))
