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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prunetune.errors import PrunetuneError
from prunetune.models.arch import ArchAdapter, Block, base_linear
from prunetune.pruning.granularity import check_sparsity

STRUCTURES = ("heads", "neurons")


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
    raise PrunetuneError(f"unknown structure '{kind}'; choose one of: {', '.join(STRUCTURES)}")


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


@torch.no_grad()
def remove_pruned(model: torch.nn.Module, kind: str) -> dict[str, int]:
    """Physically drop fully-zero KV groups / neurons from the in-memory model (faster, smaller forward).

    A removed structure is one whose weights are all zero in every member; layers shrink with their
    biases. Per-layer widths then differ from the config, so this is for in-memory inference: the saved
    plain HF directory keeps the dense shapes (with zeros), which every tool can load.
    Returns {coupling's first member name: groups removed}.
    """
    from torch import nn

    from prunetune.models.arch import get_adapter

    adapter = get_adapter(model)
    removed: dict[str, int] = {}
    for block in adapter.blocks():
        for c in couplings(adapter, block, kind):
            mods = {m.name: base_linear(adapter.root.get_submodule(m.name)) for m in c.members}
            alive = torch.zeros(c.n_groups, dtype=torch.bool)
            for m in c.members:
                w = mods[m.name].weight
                per = (w != 0).any(dim=1) if m.axis == "rows" else (w != 0).any(dim=0)
                alive |= per.reshape(c.n_groups, m.chunk).any(dim=1).cpu()
            if bool(alive.all()):
                continue
            if not bool(alive.any()):
                alive[0] = True  # keep one group so shapes stay valid
            for m in c.members:
                lin: nn.Linear = mods[m.name]
                idx = torch.nonzero(alive.repeat_interleave(m.chunk)).flatten().to(lin.weight.device)
                if m.axis == "rows":
                    lin.weight = nn.Parameter(lin.weight.index_select(0, idx))
                    if lin.bias is not None:
                        lin.bias = nn.Parameter(lin.bias.index_select(0, idx))
                    lin.out_features = idx.numel()
                else:
                    lin.weight = nn.Parameter(lin.weight.index_select(1, idx))
                    lin.in_features = idx.numel()
            removed[c.members[0].name] = int((~alive).sum())
    return removed

