"""Coupled structures: attention heads (GQA-aware) and MLP neurons, scored and masked as whole units.

A structure only disappears from the computation when every weight that produces or consumes it goes:

* an attention **KV group** of a GQA model is the k and v rows of one KV head, the q rows of the query heads
  that read it (query head h reads KV head h // (heads / kv_heads), contiguous chunks), and the o_proj
  columns that take those query heads' outputs. Removing whole KV groups keeps every remaining query head
  attached to its own KV head, so the model still runs (and can be physically shrunk). Without GQA a group
  is one head.
* an MLP **neuron** j is row j of gate and up (or BERT/T5's single input layer) and column j of down.

Each `Coupling` lists its members as (module name, axis, chunk): the weight's rows or columns split into
`n_groups` contiguous chunks of `chunk`. A group's importance is the sum over members of the member's
element scores in that chunk, each member normalised by its mean so that no single layer dominates.
`floor(sparsity × n_groups)` groups are removed per coupling (per block), the exactness a unit count allows.

`STRUCTURES` names every coupled structure (heads, neurons, hidden); `MASK_STRUCTURES` the two a MaskSet can
hold per block, which are also `prune`'s structured granularities (hidden channels are model-wide: a keep plan).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.models.arch import ArchAdapter, Block, get_adapter, unwrap
from prunetune.pruning.granularity import check_sparsity

STRUCTURES = ("heads", "neurons", "hidden")
MASK_STRUCTURES = ("heads", "neurons")


@dataclass(frozen=True)
class Member:
    name: str
    axis: str  # "rows" (outputs) | "cols" (inputs)
    chunk: int  # rows/cols per group


@dataclass(frozen=True)
class Coupling:
    kind: str  # "heads" | "neurons"
    n_groups: int
    members: tuple[Member, ...]


def couplings(adapter: ArchAdapter, block: Block, kind: str) -> list[Coupling]:
    """The head groups (self- and, for T5 decoders, cross-attention) or the MLP neurons of one block."""
    names = {role: adapter.name_of(lin).removesuffix(".base_layer") for role, lin in block.linears.items()}
    if kind == "heads":
        g = adapter.attention()
        out = []
        for q, k, v, o in (("q", "k", "v", "o"), ("cq", "ck", "cv", "co")):
            if all(r in names for r in (q, k, v, o)):
                qchunk = g.kv_groups * g.head_dim
                out.append(Coupling("heads", g.num_kv_heads, (
                    Member(names[q], "rows", qchunk), Member(names[k], "rows", g.head_dim),
                    Member(names[v], "rows", g.head_dim), Member(names[o], "cols", qchunk))))
        return out
    if kind == "neurons":
        width = adapter.mlp_width()
        members = [Member(names[r], "rows", 1) for r in ("gate", "up") if r in names]
        if "down" not in names or not members:
            return []
        return [Coupling("neurons", width, (*members, Member(names["down"], "cols", 1)))]
    raise PrunetuneError(f"unknown structure '{kind}'; choose one of: {', '.join(MASK_STRUCTURES)}")


def group_scores(coupling: Coupling, scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """[n_groups] importance: per member, element scores summed over each chunk, normalised by the member mean."""
    total = torch.zeros(coupling.n_groups, dtype=torch.float64)
    for m in coupling.members:
        s = scores[m.name].double()
        per = s.sum(dim=1) if m.axis == "rows" else s.sum(dim=0)
        if per.numel() != coupling.n_groups * m.chunk:
            raise PrunetuneError(f"{m.name}: {per.numel()} {m.axis} do not split into {coupling.n_groups} groups")
        g = per.reshape(coupling.n_groups, m.chunk).sum(dim=1)
        total += (g / g.mean().clamp_min(1e-30)).cpu()
    return total


def coupling_masks(coupling: Coupling, keep: torch.Tensor, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Expand a [n_groups] keep vector to every member's weight-shaped keep-mask."""
    out = {}
    for m in coupling.members:
        unit = keep.repeat_interleave(m.chunk)
        rows, cols = shapes[m.name]
        mask = unit[:, None].expand(rows, cols) if m.axis == "rows" else unit[None, :].expand(rows, cols)
        out[m.name] = mask.clone()
    return out


def structured_masks(adapter: ArchAdapter, block: Block, scores: dict[str, torch.Tensor], kind: str,
                     sparsity: float) -> dict[str, torch.Tensor]:
    """Keep-masks removing the floor(sparsity × n) least important groups of each coupling in `block`.

    Every member of a coupling must have scores; a skipped member would leave a half-removed structure.
    """
    sparsity = check_sparsity(sparsity)
    out: dict[str, torch.Tensor] = {}
    for c in couplings(adapter, block, kind):
        missing = [m.name for m in c.members if m.name not in scores]
        if missing:
            if len(missing) == len(c.members):
                continue
            raise PrunetuneError(f"{kind} pruning needs all coupled layers; skipped: {', '.join(missing)}")
        gs = group_scores(c, scores)
        k = math.floor(sparsity * c.n_groups)
        keep = torch.ones(c.n_groups, dtype=torch.bool)
        if k:
            keep[torch.sort(gs, stable=True).indices[:k]] = False
        out.update(coupling_masks(c, keep, {m.name: scores[m.name].shape for m in c.members}))
    return out


def block_couplings(adapter: ArchAdapter, kind: str) -> list[Coupling]:
    """One coupling per block for heads (self-attention) or neurons, in block order."""
    out = []
    for block in adapter.blocks():
        cs = couplings(adapter, block, kind)
        if kind == "heads":
            cs = cs[:1]  # self-attention (T5 cross-attention is not shrinkable)
        if len(cs) != 1:
            raise PrunetuneError(f"block {block.name} has no {kind} to shrink")
        out.append(cs[0])
    return out


def hidden_coupling(adapter: ArchAdapter) -> Coupling:
    """Every tensor that holds hidden channel c: embeddings, norms, readers (columns) and writers (rows)."""
    norms = adapter.hidden_norms()
    names = [adapter.name_of(adapter.root.get_input_embeddings())]
    members = [Member(names[0], "cols", 1)]
    members += [Member(adapter.name_of(n), "vector", 1) for n in norms]
    for block in adapter.blocks():
        for role, lin in block.linears.items():
            axis = "rows" if role in ("o", "down") else "cols"
            members.append(Member(adapter.name_of(lin), axis, 1))
    members += [Member(adapter.name_of(h), "cols", 1) for h in adapter.output_heads()]
    return Coupling("hidden", adapter.attention().hidden_size, tuple(members))


def shrinkable_adapter(model: torch.nn.Module) -> ArchAdapter:
    """The model's adapter; a peft-wrapped model is refused (its LoRA layers would not follow the surgery)."""
    if unwrap(model) is not model:
        raise PrunetuneError("shrink needs a plain transformers model: merge the LoRA adapters first")
    return get_adapter(model)


def check_structure(adapter: ArchAdapter, kind: str) -> None:
    """One-line errors for a structure this model family cannot shrink (and for an unknown name)."""
    if kind not in STRUCTURES:
        raise PrunetuneError(f"unknown structure '{kind}' to shrink; choose from: {', '.join(STRUCTURES)}")
    if kind == "hidden":
        adapter.hidden_norms()  # LayerNorm families raise their one-line reason here
    if kind not in adapter.shrinkable:
        why = {"heads": "its config has no head_dim (the head size is hidden_size / num_attention_heads), so "
                        "stock transformers cannot load fewer heads; keep them as masked zeros"}.get(kind, "")
        raise PrunetuneError(f"{adapter.config.model_type} models cannot shrink {kind}"
                             + (f": {why}" if why else ""))


def structure_units(adapter: ArchAdapter, kind: str) -> tuple[int, int]:
    """(n_layers, n_groups) of a structure: heads in KV groups, neurons per MLP, hidden once for the model."""
    if kind == "hidden":
        return 1, adapter.attention().hidden_size
    n = adapter.attention().num_kv_heads if kind == "heads" else adapter.mlp_width()
    return len(block_couplings(adapter, kind)), n


def block_linears(adapter: ArchAdapter) -> list[dict[str, nn.Linear]]:
    """Each block's prunable linears by role."""
    return [b.linears for b in adapter.blocks()]
