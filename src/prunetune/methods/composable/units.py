"""Unit training: each pruned module fine-tuned alone to reproduce the original module's output (linears on the
captured Gram matrix, attention sublayers on the captured calls).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.methods.composable.cache import ModuleCache, data_hash, model_hash
from prunetune.methods.composable.capture import BlockCapture, first_tensor, attention_container, capture_blocks
from prunetune.methods.composable.plan import (
    ATTENTION_UNITS,
    Unit,
    check_head_criterion,
    check_linear_criterion,
    linear_criterion_needs_activations,
    registered_criterion,
    scores_linear,
)
from prunetune.methods.composable.spec import ComposeSpec
from prunetune.models.arch import ArchAdapter, Block, get_adapter
from prunetune.pruning.criteria import get_criterion
from prunetune.pruning.granularity import unstructured_mask
from prunetune.pruning.shrink.couplings import Coupling, coupling_masks, couplings, group_scores


class _GramColumnNorms:
    """Column-norm statistics read off the capture's Gram diagonal (what `column_norms` criteria consume)."""

    def __init__(self, gram: torch.Tensor) -> None:
        self.sq_sum = gram.diagonal()[:-1].clamp_min(0).double()
        self.tokens = int(gram[-1, -1])

    def norms(self) -> torch.Tensor:
        return self.sq_sum.sqrt().float()


def _linear_scores(criterion: str, w: torch.Tensor, gram: torch.Tensor | None, n: int) -> torch.Tensor:
    """The registry criterion's scores; column norms (Wanda's ‖X_j‖₂) are read off the capture's Gram diagonal."""
    crit = registered_criterion(criterion)
    if crit is None or not scores_linear(crit):
        check_linear_criterion(criterion)
    if crit.statistics == "column_norms" and gram is None:
        raise PrunetuneError(f"criterion '{criterion}' needs activations: no text was given to capture them")
    return crit.score(w.detach(), _GramColumnNorms(gram) if crit.statistics == "column_norms" else None).float()


def linear_mse(w: torch.Tensor, b: torch.Tensor | None, w0: torch.Tensor, b0: torch.Tensor | None,
               gram: torch.Tensor, n: int) -> float:
    """Mean squared output error over the captured tokens, from the Gram matrix (exact)."""
    dw = _augmented(w, b) - _augmented(w0, b0)
    return float((dw * (dw @ gram)).sum() / (n * w.shape[0]))


def _augmented(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    bias = b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    return torch.cat([w.float(), bias.float()[:, None]], dim=1)


def train_linear_unit(lin: nn.Linear, unit: Unit, gram: torch.Tensor, n: int,
                      spec: ComposeSpec) -> tuple[dict[str, torch.Tensor], dict]:
    """Prune one linear and fine-tune its kept weights (and bias) to reproduce its original output (MSE)."""
    w0 = lin.weight.detach().float()
    b0 = lin.bias.detach().float() if lin.bias is not None else None
    mask = unstructured_mask(_linear_scores(unit.criterion, w0, gram, n), unit.rate, "layer")
    has_bias = b0 is not None
    full_mask = torch.cat([mask.float(), torch.full((w0.shape[0], 1), float(has_bias))], dim=1)
    target = _augmented(w0, b0)
    param = nn.Parameter(target * full_mask)
    g = gram / max(n, 1)
    before = float(((param.detach() - target) * ((param.detach() - target) @ g)).sum() / w0.shape[0])
    opt = torch.optim.Adam([param], lr=spec.linear_lr)
    curve = [before]
    for step in range(spec.linear_steps):
        with torch.no_grad():
            delta = param - target
            prod = delta @ g
            param.grad = (2.0 / w0.shape[0]) * prod * full_mask  # d/dŴ of tr(ΔŴ G ΔŴᵀ)/d_out, masked
            if step % 10 == 0 or step == spec.linear_steps - 1:
                curve.append(float((delta * prod).sum() / w0.shape[0]))
        opt.step()
        with torch.no_grad():
            param.mul_(full_mask)
    with torch.no_grad():
        delta = param - target
        after = float((delta * (delta @ g)).sum() / w0.shape[0])
    wt = param.detach()[:, :-1].to(lin.weight.dtype).contiguous()
    out = {"weight": wt, "mask": mask}
    if has_bias:
        out["bias"] = param.detach()[:, -1].to(lin.bias.dtype).contiguous()
    return out, {"mse_before": before, "mse_after": after, "curve": curve, "kept": float(mask.float().mean())}


def head_masks(adapter: ArchAdapter, block: Block, kind: str, criterion: str, rate: float) -> dict[str, torch.Tensor]:
    """Keep-masks of q/k/v removing floor(rate × groups) heads (GQA: whole KV groups) with the lowest score."""
    roles = ATTENTION_UNITS[kind]
    q_name = adapter.name_of(block.linears[roles[0]])
    c = next((c for c in couplings(adapter, block, "heads") if c.members[0].name == q_name), None)
    if c is None:
        raise PrunetuneError(f"block {block.index} has no {kind} heads to prune")
    members = tuple(m for m in c.members if m.axis == "rows")  # q, k, v rows; o reads them and is its own unit
    qkv = Coupling("heads", c.n_groups, members)
    lin = {adapter.name_of(block.linears[r]): block.linears[r] for r in roles}
    crit = get_criterion(check_head_criterion(criterion))
    scores = {n: crit.element_importance(l.weight.detach().float()) for n, l in lin.items()}
    gs = group_scores(qkv, scores)
    k = math.floor(rate * c.n_groups)
    keep = torch.ones(c.n_groups, dtype=torch.bool)
    if k:
        keep[torch.sort(gs, stable=True).indices[:k]] = False
    return coupling_masks(qkv, keep, {n: l.weight.shape for n, l in lin.items()})


def _sub_mse(out: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return ((out - target)[valid] ** 2).mean()


def train_attention_unit(model: nn.Module, adapter: ArchAdapter, block: Block, unit: Unit,
                         calls: list, spec: ComposeSpec, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """Remove heads from q/k/v and fine-tune the kept ones so the attention sublayer's output (original o
    frozen) matches the original's on the captured inputs."""
    roles = ATTENTION_UNITS[unit.kind]
    o_role = "o" if unit.kind == "attention" else "co"
    container = attention_container(adapter, block, roles[0], o_role)
    masks_by_name = head_masks(adapter, block, unit.kind, unit.criterion, unit.rate)
    # a private copy of the sublayer: the model itself stays the original
    prefix = adapter.name_of(container)
    work = copy.deepcopy(container)
    work.eval()  # no dropout: the target is deterministic
    params, masks = [], {}
    for p in work.parameters():
        p.requires_grad_(False)
    for r in roles:
        rel = adapter.name_of(block.linears[r])[len(prefix) + 1:]
        lin = work.get_submodule(rel)
        m = masks_by_name[adapter.name_of(block.linears[r])]
        rowkeep = m[:, 0]
        with torch.no_grad():
            lin.weight.mul_(m)
            if lin.bias is not None:
                lin.bias.mul_(rowkeep)
        masks[r] = (lin, m, rowkeep)
        lin.weight.requires_grad_(True)
        params.append(lin.weight)
        if lin.bias is not None:
            lin.bias.requires_grad_(True)
            params.append(lin.bias)

    def eval_mse() -> float:
        with torch.no_grad():
            tot, cnt = 0.0, 0
            for a, kw, target, valid in calls:
                out = first_tensor(work(*a, **kw))
                tot += float(((out - target)[valid] ** 2).sum())
                cnt += int(valid.sum()) * target.shape[-1]
            return tot / max(cnt, 1)

    before = eval_mse()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=spec.attention_lr)
    curve = [before]
    for step in range(spec.attention_steps):
        i = int(torch.randint(len(calls), (1,), generator=gen))
        a, kw, target, valid = calls[i]
        loss = _sub_mse(first_tensor(work(*a, **kw)), target, valid)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for lin, m, rowkeep in masks.values():
                lin.weight.mul_(m)
                if lin.bias is not None:
                    lin.bias.mul_(rowkeep)
        if step % 10 == 0:
            curve.append(float(loss.detach()))
    after = eval_mse()
    out: dict[str, torch.Tensor] = {}
    for r, (lin, m, _) in masks.items():
        out[f"{r}.weight"] = lin.weight.detach().contiguous()
        out[f"{r}.mask"] = m
        if lin.bias is not None:
            out[f"{r}.bias"] = lin.bias.detach().contiguous()
    return out, {"mse_before": before, "mse_after": after, "curve": curve,
                 "heads_removed": int((~masks[roles[0]][2]).sum()) // max(1, adapter.attention().head_dim)}


def unit_roles(unit: Unit) -> tuple[str, ...]:
    return ATTENTION_UNITS.get(unit.kind, (unit.kind,))


@dataclass
class UnitResults:
    """Fine-tuned tensors per unit id (`role.weight`, `role.bias`, `role.mask`) and what it cost."""

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    stats: dict[str, dict] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=lambda: {"capture_s": 0.0, "train_s": 0.0, "load_s": 0.0})
    trained: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"trained": len(self.trained), "from_cache": len(self.cached), "timings": self.timings,
                "units": self.stats}


def train_units(model: nn.Module, batches: Sequence[dict], units: Sequence[Unit], spec: ComposeSpec,
                cache: ModuleCache | None = None, *, seed: int = 0, finetune: bool = True,
                progress: Callable[[str], None] | None = None) -> UnitResults:
    """Prune (and with `finetune`, fine-tune) every unit once; one activation capture per block for all its
    missing units. With `finetune=False` the units are just pruned (the baseline's starting point; no cache), an
    activation criterion's linears from one capture of `batches`. `spec` gives the module-level steps and
    learning rates (the recipe's `compose` section), `seed` the sampling and initialisation."""
    adapter = get_adapter(model)
    blocks = {b.index: b for b in adapter.blocks()}
    res = UnitResults()
    m_h = model_hash(model) if cache is not None else ""
    d_h = data_hash(batches) if cache is not None else ""
    keys: dict[str, tuple[str, dict]] = {}
    todo: dict[int, list[Unit]] = {}
    for u in units:
        if finetune and cache is not None:
            t0 = time.perf_counter()
            key, meta = cache.key(u, m_h, d_h, spec, seed)
            keys[u.id] = (key, meta)
            hit = cache.get(key)
            res.timings["load_s"] += time.perf_counter() - t0
            if hit is not None:
                res.tensors[u.id] = hit
                res.cached.append(u.id)
                res.stats[u.id] = {"cached": True}
                continue
        todo.setdefault(u.block, []).append(u)
    torch.manual_seed(seed)
    if not finetune:
        # an activation criterion (Wanda) scores from the inputs' column norms: the same capture of the original
        # model on `batches` that module-level FT makes, linears only, so both arms start from the same mask
        needs = {bi: ({u.kind for u in bu if u.kind not in ATTENTION_UNITS and linear_criterion_needs_activations(u.criterion)},
                      set()) for bi, bu in todo.items()}
        needs = {bi: n for bi, n in needs.items() if n[0]}
        caps: dict[int, BlockCapture] = {}
        if needs and batches:
            t0 = time.perf_counter()
            caps = capture_blocks(model, adapter, needs, batches)
            res.timings["capture_s"] += time.perf_counter() - t0
        for bi in sorted(todo):
            grams = caps[bi].gram if bi in caps else {}
            for u in todo[bi]:
                res.tensors[u.id] = _prune_only(adapter, blocks[bi], u, grams.get(u.kind))
                res.stats[u.id] = {"finetuned": False}
        return res
    needs = {bi: ({u.kind for u in bu if u.kind not in ATTENTION_UNITS}, {u.kind for u in bu if u.kind in ATTENTION_UNITS})
             for bi, bu in todo.items()}
    caps: dict[int, BlockCapture] = {}
    if needs:
        t0 = time.perf_counter()
        caps = capture_blocks(model, adapter, needs, batches)
        res.timings["capture_s"] += time.perf_counter() - t0
    for bi in sorted(todo):
        block, bunits, cap = blocks[bi], todo[bi], caps.pop(bi)
        if progress:
            progress(f"block {bi}: training {len(bunits)} units on {cap.tokens} captured tokens")
        for u in bunits:
            t0 = time.perf_counter()
            if u.kind in ATTENTION_UNITS:
                tensors, stats = train_attention_unit(model, adapter, block, u, cap.attention[u.kind], spec, seed)
            else:
                lin = block.linears[u.kind]
                n = int(cap.gram[u.kind][-1, -1])  # the ones column counts the tokens this input saw
                t, stats = train_linear_unit(lin, u, cap.gram[u.kind], n, spec)
                tensors = {f"{u.kind}.{k}": v for k, v in t.items()}
            stats["train_s"] = time.perf_counter() - t0
            res.timings["train_s"] += stats["train_s"]
            res.tensors[u.id] = tensors
            res.stats[u.id] = stats
            res.trained.append(u.id)
            if cache is not None:
                key, meta = keys[u.id]
                cache.put(key, tensors, {**meta, "unit_id": u.id, "stats": stats})
        del cap
    return res


@torch.no_grad()
def _prune_only(adapter: ArchAdapter, block: Block, unit: Unit,
                gram: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The unit pruned, not fine-tuned; `gram` (the captured inputs) for a criterion that scores from them."""
    if unit.kind in ATTENTION_UNITS:
        masks = head_masks(adapter, block, unit.kind, unit.criterion, unit.rate)
        out = {}
        for r in ATTENTION_UNITS[unit.kind]:
            lin = block.linears[r]
            m = masks[adapter.name_of(lin)]
            out[f"{r}.weight"] = lin.weight.detach() * m
            out[f"{r}.mask"] = m
            if lin.bias is not None:
                out[f"{r}.bias"] = lin.bias.detach() * m[:, 0]
        return out
    lin = block.linears[unit.kind]
    n = int(gram[-1, -1]) if gram is not None else 0
    mask = unstructured_mask(_linear_scores(unit.criterion, lin.weight, gram, n), unit.rate, "layer")
    out = {f"{unit.kind}.weight": lin.weight.detach() * mask, f"{unit.kind}.mask": mask}
    if lin.bias is not None:
        out[f"{unit.kind}.bias"] = lin.bias.detach().clone()
    return out
