"""Physical removal (surgery): masks, keep plans and `shrink`.

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

`shrink_selection` / `apply_masks` do the same for a `widths.Selection` (structured pruning's kept indices), and
`flap_compensate` adds FLAP's bias compensation for what a selection removes.
"""

from __future__ import annotations

import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.models.arch import ArchAdapter, base_linear, get_adapter, unwrap
from prunetune.pruning.criteria.flap import MomentStats
from prunetune.pruning.masks import MaskSet
from prunetune.pruning.shrink.couplings import (
    STRUCTURES,
    Coupling,
    block_couplings,
    block_linears,
    check_structure,
    couplings,
    hidden_coupling,
    shrinkable_adapter,
    structure_units,
)
from prunetune.pruning.shrink.widths import Selection, geometry, keep_plan


@torch.no_grad()
def remove_pruned(model: torch.nn.Module, kind: str) -> dict[str, int]:
    """Physically drop fully-zero KV groups / neurons from the in-memory model (faster, smaller forward).

    A removed structure is one whose weights are all zero in every member; layers shrink with their
    biases. Per-layer widths then differ from the config, so this is for in-memory inference only; for a
    model that saves and loads in stock transformers (uniform widths, config rewritten) use `shrink`.
    Returns {coupling's first member name: groups removed}.
    """
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


@torch.no_grad()
def keep_from_masks(model: torch.nn.Module, masks=None, kinds: tuple[str, ...] = ("heads", "neurons")
                    ) -> dict[str, torch.Tensor]:
    """The keep plan a MaskSet (or, without one, the zeros in the weights) already encodes.

    A structure is removed when every weight of every member in its chunk is pruned. The plan must keep the
    same number in every layer: transformers has no per-layer widths.
    """
    adapter = shrinkable_adapter(model)
    plan: dict[str, torch.Tensor] = {}
    for kind in kinds:
        check_structure(adapter, kind)
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
        check_structure(adapter, kind)
        layers, n = structure_units(adapter, kind)
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
    adapter = shrinkable_adapter(model)
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
    adapter = shrinkable_adapter(model)
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


@torch.no_grad()
def apply_masks(model: nn.Module, sel: Selection) -> None:
    """Zero every removed structure in place: the masked model whose logits `shrink` reproduces."""
    plan = keep_plan(model, sel)
    mask_structures(model, {k: v for k, v in plan.items() if not bool(v.all())})


def shrink_selection(model: nn.Module, sel: Selection, structures: tuple[str, ...] = STRUCTURES) -> nn.Module:
    """Physically remove what `sel` drops with the adapter's surgery; the config is rewritten for stock
    `from_pretrained` (RMSNorm gains and eps corrected for hidden channels)."""
    plan = keep_plan(model, sel)
    shrink(model, {k: v for k, v in plan.items() if not bool(v.all())})
    return model


def _removed(kept: torch.Tensor, n: int) -> torch.Tensor:
    keep = torch.zeros(n, dtype=torch.bool)
    keep[kept] = True
    return ~keep


@torch.no_grad()
def flap_compensate(model: nn.Module, sel: Selection, stats: dict[str, MomentStats]) -> None:
    """FLAP's bias compensation: a removed input column j of o_proj/down_proj is replaced by its mean
    contribution W[:, j]·E[x_j], added to the layer's bias.

    Llama has no bias there, so the model gets `attention_bias` / `mlp_bias` (stock LlamaConfig flags: the
    export loads in plain transformers); q/k/v and gate/up get zero biases, as those flags give every
    projection of the module a bias.
    """
    ensure_biases(model)
    adapter = get_adapter(model)
    geom = geometry(model)
    qchunk = geom.groups * geom.head_dim
    for l, lin in enumerate(block_linears(adapter)):
        for out_role, gone in (("o", _removed(sel.kv[l], geom.kv_heads).repeat_interleave(qchunk)),
                               ("down", _removed(sel.neurons[l], geom.inter))):
            layer = lin[out_role]
            mean = stats[adapter.name_of(layer)].mean().to(layer.weight.device)
            comp = (layer.weight.double()[:, gone] @ mean[gone]).to(layer.weight.dtype)
            layer.bias += comp


def ensure_biases(model: nn.Module) -> None:
    """Zero biases on every projection that has none, and the stock config flags that make transformers build
    them (`attention_bias` covers q/k/v/o, `mlp_bias` gate/up/down): what a compensation bias rides on."""
    adapter = get_adapter(model)
    for lin in block_linears(adapter):
        for m in lin.values():
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device),
                                      requires_grad=False)
    cfg = unwrap(model).config
    cfg.attention_bias = True
    cfg.mlp_bias = True
