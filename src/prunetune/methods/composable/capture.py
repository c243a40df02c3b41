"""One capture per block of the original model's activations on the training text (forward hooks): the inputs and
outputs every unit of the block is trained against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunetune.models.arch import ArchAdapter, Block


class _Stop(Exception):
    """Raised by the hook after the captured block: the rest of the forward pass is not needed."""


def _detach(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detach(v) for v in x)
    if isinstance(x, list):
        return [_detach(v) for v in x]
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


def _is_cache(v: Any) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover
        return False
    return isinstance(v, Cache)


def first_tensor(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def attention_container(adapter: ArchAdapter, block: Block, q_role: str, o_role: str) -> nn.Module:
    """The smallest module holding both the q and the o projection: the attention sublayer a unit trains."""
    qn, on = adapter.name_of(block.linears[q_role]), adapter.name_of(block.linears[o_role])
    qp, op = qn.split("."), on.split(".")
    common = []
    for a, b in zip(qp, op):
        if a != b:
            break
        common.append(a)
    return adapter.root.get_submodule(".".join(common))


@dataclass
class BlockCapture:
    """What one pass of the original model on the training text leaves for one block's units.

    `gram[role]` is Σ x̃x̃ᵀ over the valid tokens of the role's input (x̃ = [x, 1]), `tokens` their count;
    `attention[kind]` holds per batch the sublayer's call (args, kwargs), its output and the token mask.
    """

    gram: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0
    attention: dict[str, list[tuple[tuple, dict, torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


@torch.no_grad()
def capture_blocks(model: nn.Module, adapter: ArchAdapter, needs: dict[int, tuple[set[str], set[str]]],
                   batches: Sequence[dict]) -> dict[int, BlockCapture]:
    """ONE pass of the original model over `batches`, recording for every block in `needs` (block index ->
    (linear roles, attention kinds)) what its units need; the pass stops after the last of those blocks.

    Memory: one Gram matrix per linear input, plus each attention sublayer's inputs and outputs (hidden
    states of the training text) for the blocks holding attention units.
    """
    blocks = {b.index: b for b in adapter.blocks()}
    caps = {bi: BlockCapture() for bi in needs}
    state: dict[str, Any] = {}
    handles = []
    for bi, (roles, kinds) in needs.items():
        handles += _capture_hooks(adapter, blocks[bi], caps[bi], roles, kinds, state)
    last = blocks[max(needs)]

    def stop(mod, args, output):
        raise _Stop

    handles.append(last.module.register_forward_hook(stop))
    was = model.training
    model.eval()
    try:
        for b in batches:
            state["valid"] = b["attention_mask"].bool()
            if "decoder_attention_mask" in b:
                state["valid_dec"] = b["decoder_attention_mask"].bool()
            elif "labels" in b and b["labels"].dim() == 2:
                state["valid_dec"] = b["labels"] != -100
            for c in caps.values():
                c.tokens += int(state["valid"].sum())
            try:
                model(**b)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return caps


def _capture_hooks(adapter: ArchAdapter, block: Block, cap: BlockCapture, roles: set[str], attention_kinds: set[str],
                   state: dict) -> list:
    handles = []

    def gram_hook(role: str):
        def hook(mod, args):
            x = args[0]
            valid = state["valid"]
            if x.shape[:-1] != valid.shape:  # e.g. decoder-side inputs: the mask of that side
                valid = state.get("valid_dec", torch.ones(x.shape[:-1], dtype=torch.bool))
            xs = x[valid].float()
            xs = torch.cat([xs, torch.ones(xs.shape[0], 1)], dim=1)
            g = xs.T @ xs
            cap.gram[role] = cap.gram[role] + g if role in cap.gram else g
        return hook

    for role in sorted(roles):
        handles.append(block.linears[role].register_forward_pre_hook(gram_hook(role)))

    def container_hook(kind: str):
        def pre(mod, args, kwargs):
            # a KV cache object would be mutated by every replay: replays run without one
            kw = {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}
            state[f"call.{block.index}.{kind}"] = (_detach(args), _detach(kw))

        def post(mod, args, kwargs, output):
            a, kw = state.pop(f"call.{block.index}.{kind}")
            out = first_tensor(output).detach()
            valid = state["valid"] if out.shape[:-1] == state["valid"].shape else state.get(
                "valid_dec", torch.ones(out.shape[:-1], dtype=torch.bool))
            cap.attention.setdefault(kind, []).append((a, kw, out, valid))
        return pre, post

    for kind in attention_kinds:
        q, o = ("q", "o") if kind == "attention" else ("cq", "co")
        cont = attention_container(adapter, block, q, o)
        pre, post = container_hook(kind)
        handles.append(cont.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(cont.register_forward_hook(post, with_kwargs=True))
    return handles
