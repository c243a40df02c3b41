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

Physical removal (surgery)
--------------------------
A third coupling, the **hidden channel** c (RMSNorm families only), is column c of the embeddings, entry c of
every norm over the residual stream, column c of every projection reading the stream (q k v gate up, LM head
and classifier, tied embeddings included) and row c of every projection writing it (o, down).

`shrink(model, keep)` removes structures physically and rewrites the config, so the saved model loads with
stock `AutoModelFor*.from_pretrained` (no prunetune, no trust_remote_code). `keep` maps a structure to a
bool keep-tensor (True = keep)::

    {"heads":   [n_blocks, num_kv_heads]  (a whole GQA group: 1 KV head, its query heads, their o columns),
     "neurons": [n_blocks, mlp_width],
     "hidden":  [hidden_size]}

transformers has no per-layer widths, so every row of a tensor must keep the same count (a non-uniform
plan is a one-line `PrunetuneError`). Build a plan with `keep_from_scores(model, scores, sparsity=...,
round_to=...)` (uniform top-k per layer, widths rounded to a multiple, 64 channels by default and whole KV
groups for heads) or `keep_from_masks(model, masks)` (structures a MaskSet already removed, e.g. from
`prune(..., granularity="heads")`). `mask_structures(model, keep)` zeroes the same structures without
changing shapes: the masked model whose logits `shrink` reproduces (exactly for heads and neurons).

Hidden channels: keep k of d channels, the removed ones being zero in the residual stream. With
ms = mean(x²) over all d channels, an RMSNorm over the kept channels sees mean(x²) = (d/k)·ms, so

    g'·x / sqrt((d/k)·ms + eps') = g'·sqrt(k/d)·x / sqrt(ms + eps'·k/d),

which equals the original g·x / sqrt(ms + eps) for every x exactly when g' = g·sqrt(d/k) and
eps' = eps·d/k. Measured on the tiny random Llama (max |logit| 0.6) at 25% / 50% of 64 channels removed: no
correction moves the logits by 0.11 / 0.21, gains alone by 3.7e-4 / 7.6e-4, gains and eps by 2e-7 / 1.5e-7
(the residual stream of a random init is small, so eps is not negligible there). `shrink` applies both
(eps through `rms_norm_eps`, shared by every RMSNorm of the model; Qwen3's per-head q/k norms see that
changed eps too: an error of order eps, 2.4e-5 on the tiny Qwen3).
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
    biases. Per-layer widths then differ from the config, so this is for in-memory inference only; for a
    model that saves and loads in stock transformers (uniform widths, config rewritten) use `shrink`.
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



# ============================================================================================== surgery
SHRINK_KINDS = ("heads", "neurons", "hidden")
DEFAULT_ROUND_TO = {"heads": 1, "neurons": 64, "hidden": 64}  # heads: in KV groups; others: channels


def _adapter(model: torch.nn.Module) -> ArchAdapter:
    from prunetune.models.arch import get_adapter, unwrap

    if unwrap(model) is not model:
        raise PrunetuneError("shrink needs a plain transformers model: merge the LoRA adapters first")
    return get_adapter(model)


def _check_kind(adapter: ArchAdapter, kind: str) -> None:
    if kind not in SHRINK_KINDS:
        raise PrunetuneError(f"unknown structure '{kind}' to shrink; choose from: {', '.join(SHRINK_KINDS)}")
    if kind == "hidden":
        adapter.hidden_norms()  # LayerNorm families raise their one-line reason here
    if kind not in adapter.shrinkable:
        why = {"heads": "its config has no head_dim (the head size is hidden_size / num_attention_heads), so "
                        "stock transformers cannot load fewer heads; keep them as masked zeros"}.get(kind, "")
        raise PrunetuneError(f"{adapter.config.model_type} models cannot shrink {kind}"
                             + (f": {why}" if why else ""))


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


def _units(adapter: ArchAdapter, kind: str) -> tuple[int, int]:
    """(n_layers, n_groups) of a structure: heads in KV groups, neurons per MLP, hidden once for the model."""
    if kind == "hidden":
        return 1, adapter.attention().hidden_size
    n = adapter.attention().num_kv_heads if kind == "heads" else adapter.mlp_width()
    return len(block_couplings(adapter, kind)), n


def structure_scores(model: torch.nn.Module, kind: str, scores: dict[str, torch.Tensor] | None = None
                     ) -> torch.Tensor:
    """[n_blocks, n_groups] importance of each KV group or MLP neuron, from element scores of its members.

    `scores` maps module name -> weight-shaped element scores (|W| when omitted; Wanda's |W|·‖X‖ or any
    criterion's output otherwise), combined per coupling as `group_scores` does for masks, so a plan from
    `keep_from_scores(model, {kind: structure_scores(...)}, ...)` removes what `prune(granularity=kind)` would.
    """
    adapter = _adapter(model)
    _check_kind(adapter, kind)
    if kind == "hidden":
        raise PrunetuneError("hidden-channel scores are model-wide: pass a [hidden_size] tensor to keep_from_scores")
    cs = block_couplings(adapter, kind)
    if scores is None:
        scores = {m.name: base_linear(adapter.root.get_submodule(m.name)).weight.detach().abs()
                  for c in cs for m in c.members}
    return torch.stack([group_scores(c, scores) for c in cs])


def rounded_keep(kind: str, n: int, kept: int, round_to: int) -> int:
    """`kept` moved to the nearest multiple of `round_to` (never 0 nor more than n)."""
    what = {"heads": "KV groups per layer", "neurons": "MLP neurons per layer", "hidden": "hidden channels"}[kind]
    if round_to < 1:
        raise PrunetuneError(f"round_to must be >= 1, got {round_to}")
    if round_to > n:
        raise PrunetuneError(f"round_to {round_to} is larger than the {n} {what}: use a smaller multiple")
    if kept <= 0 and kind == "heads":
        raise PrunetuneError(f"this sparsity would remove every attention head of each layer ({n} {what}); "
                             "keep at least one KV group")
    r = round_to * round(kept / round_to)
    if r > n:
        r = round_to * (n // round_to)
    return max(r, round_to)


def keep_from_scores(model: torch.nn.Module, scores: dict[str, torch.Tensor], *,
                     sparsity: float | dict[str, float] | None = None, keep: int | dict[str, int] | None = None,
                     round_to: int | dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """A uniform keep plan from per-structure scores (higher = more important).

    `scores[kind]` is [n_blocks, n_groups] (heads: per KV group; neurons) or [hidden_size]. Each layer keeps
    the same count, its own top-scored structures: `keep` (a count) or round((1 - sparsity) × n), moved to the
    nearest multiple of `round_to` (default 64 channels for neurons / hidden, 1 KV group for heads) by adding
    or dropping structures in score order.
    """
    adapter = _adapter(model)
    plan: dict[str, torch.Tensor] = {}
    for kind, sc in scores.items():
        _check_kind(adapter, kind)
        layers, n = _units(adapter, kind)
        sc = sc.detach().double().cpu().reshape(layers, n) if kind != "hidden" else sc.detach().double().cpu()[None]
        if sc.shape != (layers, n):
            raise PrunetuneError(f"{kind} scores have shape {tuple(sc.shape)}, expected ({layers}, {n})")
        s_k = sparsity.get(kind) if isinstance(sparsity, dict) else sparsity
        k_k = keep.get(kind) if isinstance(keep, dict) else keep
        if k_k is None:
            if s_k is None:
                raise PrunetuneError(f"give a sparsity or a keep count for {kind}")
            k_k = round((1.0 - check_sparsity(s_k)) * n)
        r = round_to.get(kind) if isinstance(round_to, dict) else round_to
        k_k = rounded_keep(kind, n, int(k_k), DEFAULT_ROUND_TO[kind] if r is None else int(r))
        mask = torch.zeros(layers, n, dtype=torch.bool)
        top = torch.sort(sc, dim=1, descending=True, stable=True).indices[:, :k_k]
        mask.scatter_(1, top, True)
        plan[kind] = mask if kind != "hidden" else mask[0]
    return plan


@torch.no_grad()
def keep_from_masks(model: torch.nn.Module, masks=None, kinds: tuple[str, ...] = ("heads", "neurons")
                    ) -> dict[str, torch.Tensor]:
    """The keep plan a MaskSet (or, without one, the zeros in the weights) already encodes.

    A structure is removed when every weight of every member in its chunk is pruned. The plan must keep the
    same number in every layer: transformers has no per-layer widths.
    """
    adapter = _adapter(model)
    plan: dict[str, torch.Tensor] = {}
    for kind in kinds:
        _check_kind(adapter, kind)
        if kind == "hidden":
            raise PrunetuneError("hidden channels are not in a MaskSet: pass a keep plan from keep_from_scores")
        rows = []
        for c in block_couplings(adapter, kind):
            alive = torch.zeros(c.n_groups, dtype=torch.bool)
            for m in c.members:
                if masks is not None and m.name in masks:
                    keep = masks[m.name].cpu()
                else:
                    keep = (base_linear(adapter.root.get_submodule(m.name)).weight != 0).cpu()
                per = keep.any(dim=1) if m.axis == "rows" else keep.any(dim=0)
                alive |= per.reshape(c.n_groups, m.chunk).any(dim=1)
            rows.append(alive)
        plan[kind] = torch.stack(rows)
    return plan


def _check_plan(adapter: ArchAdapter, plan: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for kind, keep in plan.items():
        _check_kind(adapter, kind)
        layers, n = _units(adapter, kind)
        keep = torch.as_tensor(keep).to(torch.bool).cpu()
        keep2 = keep.reshape(1, -1) if kind == "hidden" else keep
        if tuple(keep2.shape) != (layers, n):
            want = f"[{n}]" if kind == "hidden" else f"[{layers}, {n}]"
            raise PrunetuneError(f"{kind} keep plan has shape {list(keep.shape)}, expected {want}")
        counts = keep2.sum(dim=1)
        if kind == "heads" and int(counts.min()) == 0:
            raise PrunetuneError("the keep plan removes every attention head of a layer; keep at least one KV group")
        if kind != "heads" and int(counts.min()) == 0:
            raise PrunetuneError(f"the keep plan removes every {kind[:-1] if kind != 'hidden' else 'hidden'} "
                                 "channel of a layer")
        if int(counts.min()) != int(counts.max()):
            raise PrunetuneError(
                f"{kind}: layers keep different counts ({', '.join(str(int(c)) for c in counts)}); transformers "
                f"has no per-layer widths, so every layer must keep the same number (use keep_from_scores)")
        out[kind] = keep
    return out


def _members(adapter: ArchAdapter, kind: str) -> list[Coupling]:
    """The couplings a plan's rows refer to: one per block, or the single model-wide hidden coupling."""
    return [hidden_coupling(adapter)] if kind == "hidden" else block_couplings(adapter, kind)


@torch.no_grad()
def mask_structures(model: torch.nn.Module, keep: dict[str, torch.Tensor]) -> None:
    """Zero every weight of the removed structures in place (shapes unchanged).

    For hidden channels the writers (embedding columns, o/down rows and their biases) are zeroed, so the
    channel is zero in the residual stream; readers and norm gains then see a zero and need no change.
    """
    adapter = _adapter(model)
    plan = _check_plan(adapter, keep)
    for kind, k in plan.items():
        rows = k.reshape(1, -1) if kind == "hidden" else k
        for c, alive in zip(_members(adapter, kind), rows):
            for m in c.members:
                mod = base_linear(adapter.root.get_submodule(m.name))
                unit = alive.repeat_interleave(m.chunk).to(mod.weight.device)
                if kind == "hidden" and m.axis != "rows" and not isinstance(mod, torch.nn.Embedding):
                    continue  # readers and norms: the channel is already zero when they see it
                if m.axis == "rows":
                    mod.weight.mul_(unit[:, None].to(mod.weight.dtype))
                    if getattr(mod, "bias", None) is not None:
                        mod.bias.mul_(unit.to(mod.bias.dtype))
                elif m.axis == "cols":
                    mod.weight.mul_(unit[None, :].to(mod.weight.dtype))


def _take(mod: torch.nn.Module, axis: str, idx: torch.Tensor) -> None:
    """Keep entries `idx` of a Linear's rows/cols, an Embedding's columns or a norm's gain (in place)."""
    from torch import nn

    idx = idx.to(mod.weight.device)
    new = lambda t, dim: nn.Parameter(t.index_select(dim, idx).clone(), requires_grad=t.requires_grad)  # noqa: E731
    if axis == "rows":
        mod.weight = new(mod.weight, 0)
        if mod.bias is not None:
            mod.bias = new(mod.bias, 0)
        mod.out_features = idx.numel()
    elif axis == "cols":
        mod.weight = new(mod.weight, 1)
        if isinstance(mod, nn.Embedding):
            mod.embedding_dim = idx.numel()
        else:
            mod.in_features = idx.numel()
    else:  # a norm's gain (and bias)
        mod.weight = new(mod.weight, 0)
        if getattr(mod, "bias", None) is not None:
            mod.bias = new(mod.bias, 0)
        if hasattr(mod, "normalized_shape"):
            mod.normalized_shape = (idx.numel(),)


@torch.no_grad()
def shrink(model: torch.nn.Module, keep) -> dict[str, dict[str, int]]:
    """Remove structures physically and update the config; returns {kind: {"before": n, "after": kept}}.

    `keep`: a plan {kind: bool tensor} (see the module docstring) or a MaskSet (then `keep_from_masks`).
    The model is changed in place; `save_pretrained` then writes a directory that stock transformers loads.
    Masks of the shrunk layers no longer match their shapes: re-derive them with `MaskSet.from_model`.
    """
    from prunetune.pruning.masks import MaskSet

    adapter = _adapter(model)
    if isinstance(keep, MaskSet):
        present = [k for k in ("heads", "neurons") if k in adapter.shrinkable]
        keep = keep_from_masks(model, keep, tuple(present))
    plan = _check_plan(adapter, keep)
    _check_loadable_config(adapter, plan)
    root = adapter.root
    summary: dict[str, dict[str, int]] = {}
    for kind in ("neurons", "heads", "hidden"):  # hidden last: its members include every projection
        if kind not in plan:
            continue
        k = plan[kind]
        rows = k.reshape(1, -1) if kind == "hidden" else k
        kept = int(rows[0].sum())
        summary[kind] = {"before": int(rows.shape[1]), "after": kept}
        if kept == rows.shape[1]:
            continue
        if kind == "hidden":
            _shrink_hidden(adapter, k)
        else:
            for c, alive in zip(_members(adapter, kind), rows):
                for m in c.members:
                    idx = torch.nonzero(alive.repeat_interleave(m.chunk)).flatten()
                    _take(base_linear(root.get_submodule(m.name)), m.axis, idx)
        adapter.set_width(kind, kept)
        adapter = type(adapter)(root)  # geometry read from the updated config
    # recorded for `prunetune info` (original and current widths); stock transformers ignores unknown fields
    done = dict(getattr(root.config, "prunetune_shrink", None) or {})
    for kind, v in summary.items():
        if v["after"] != v["before"] or kind in done:
            done[kind] = {"before": done.get(kind, v)["before"], "after": v["after"]}
    if done:
        root.config.prunetune_shrink = done
    return summary


def _check_loadable_config(adapter: ArchAdapter, plan: dict[str, torch.Tensor]) -> None:
    """Refuse, before any tensor changes, widths whose config stock transformers would not load.

    (LlamaConfig, for one, requires hidden_size to be a multiple of num_attention_heads even with head_dim set.)
    """
    import copy

    trial = copy.copy(adapter)
    trial.config = copy.deepcopy(adapter.config)
    for kind in ("neurons", "heads", "hidden"):
        if kind in plan:
            rows = plan[kind].reshape(1, -1) if kind == "hidden" else plan[kind]
            trial.set_width(kind, int(rows[0].sum()))
    try:
        type(trial.config).from_dict(trial.config.to_dict())
    except Exception as exc:  # the config class's own validation: its message says what is wrong
        msg = " ".join(str(exc).split())
        raise PrunetuneError(f"these widths give a config {type(trial.config).__name__} refuses: {msg}") from None


def _shrink_hidden(adapter: ArchAdapter, keep: torch.Tensor) -> None:
    """Drop hidden channels; rescale RMSNorm gains by sqrt(d/k) and eps by d/k (exact, see module docstring)."""
    root = adapter.root
    d, k = keep.numel(), int(keep.sum())
    idx = torch.nonzero(keep).flatten()
    emb, out_emb = root.get_input_embeddings(), root.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight is emb.weight
    coupling = hidden_coupling(adapter)
    for m in coupling.members:
        mod = root.get_submodule(m.name)
        if tied and mod is out_emb:
            continue
        _take(base_linear(mod), m.axis, idx)
    if tied:
        out_emb.weight = emb.weight
        out_emb.in_features = k
    scale = (d / k) ** 0.5
    for norm in adapter.hidden_norms():
        norm.weight.mul_(scale)
    eps = float(adapter.config.rms_norm_eps) * d / k
    adapter.config.rms_norm_eps = eps
    for mod in root.modules():  # every RMSNorm reads the config's eps when reloaded: match it in memory
        if hasattr(mod, "variance_epsilon"):
            mod.variance_epsilon = eps
