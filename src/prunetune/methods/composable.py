"""Composable pruning: fine-tune every pruned module once, then compose many pruned configurations from them.

Someone who needs several pruned versions of one model (different attention and linear pruning rates) would
otherwise recover each version from scratch. Modules shared between versions are pruned and fine-tuned once,
at module level, and composed into every version; each version then starts its model-level fine-tuning from a
better point and needs fewer steps. The flow:

    configurations  [(attention rate, linear rate), ...]   global, or one rate per block
      -> plan():    unique units (block, module, criterion, rate); rate 0 means "left dense", no unit
      -> train_units(): per block, ONE capture of the original model's activations on the training text
                    (forward hooks), then every missing unit of that block is pruned and fine-tuned to
                    reproduce the original module's output on the original module's inputs (MSE);
                    results go to a safetensors cache keyed by everything they depend on
      -> compose(): each configuration's model = the original with every pruned module swapped in,
                    plus the MaskSet that keeps pruned weights at zero during model-level fine-tuning

The modules (units) of a block, by default (the seed's choice):

* ``attention`` — q, k, v pruned by whole heads (head-wise L1; a GQA KV group with its query heads is one
  unit, `pruning.shrink.couplings.couplings`) at the attention rate. Kept rows of q/k/v reproduce their own
  outputs exactly, so a module made of q/k/v alone could learn nothing: the unit is the attention sublayer
  (softmax and the *original, frozen* o-projection included, found as the smallest module holding q and o)
  and q/k/v learn to make up for the removed heads in the sublayer's output.
* ``o``, ``gate``, ``up``, ``down`` — each linear pruned unstructured (L1 by default) at the linear rate and
  fine-tuned alone against the original layer's output. Its MSE over all captured tokens is the quadratic
  ``tr(ΔŴ H ΔŴᵀ) / (n·d_out)`` with ``H = Σ x̃ x̃ᵀ`` (x̃ = [x, 1] for the bias): the capture accumulates H
  (small, shared by every linear that reads the same input and by every rate), and each Adam step costs one
  ``d_out × d_in²`` product instead of a pass over all tokens. The steps are exact full-batch gradient steps.

T5 decoders add ``cross-attention`` (cq/ck/cv) and ``co``. Units are trained independently against the
original model; their small disagreements after composition are what the short model-level fine-tuning fixes.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.models.arch import ArchAdapter, Block, get_adapter, unwrap
from prunetune.pruning.criteria import CRITERIA, Criterion, criterion_names, get_criterion
from prunetune.pruning.granularity import unstructured_mask
from prunetune.pruning.masks import MaskSet
from prunetune.pruning.shrink.couplings import Coupling, coupling_masks, couplings, group_scores

#: module kinds a configuration rate applies to: attention units take the attention rate, linears the linear rate
ATTENTION_UNITS = {"attention": ("q", "k", "v"), "cross-attention": ("cq", "ck", "cv")}
LINEAR_ROLES = ("o", "co", "gate", "up", "down")
ALL_UNITS = tuple(ATTENTION_UNITS) + LINEAR_ROLES
DEFAULT_ATTENTION_UNITS = ("attention", "cross-attention")
DEFAULT_LINEAR_UNITS = LINEAR_ROLES
# Criteria are the registry's (`pruning.criteria`): a linear unit takes any that scores weights from the weights
# or input column norms (l1 = l1-global's |W|, wanda, ...), a head any that scores structures from the weights
# (l1: |W|, l2: W², summed per head).
CACHE_FORMAT = 1


# ------------------------------------------------------------------------------------------ configurations
Rate = float | tuple[float, ...]


def _check_rate(r: float, what: str) -> float:
    try:
        r = float(r)
    except (TypeError, ValueError):
        raise PrunetuneError(f"{what} rate must be a number in [0, 1), got '{r}'") from None
    if not (0.0 <= r < 1.0) or math.isnan(r):
        raise PrunetuneError(f"{what} rate must be in [0, 1), got {r}")
    return r


def parse_rate(value: float | str | Sequence[float], what: str) -> Rate:
    """A global rate (0.5) or one rate per block ('0.1,0.2,0.3' or a list)."""
    if isinstance(value, str):
        parts = [p for p in value.replace(";", ",").split(",") if p.strip()]
        if not parts:
            raise PrunetuneError(f"{what} rate is empty")
        value = parts if len(parts) > 1 else parts[0]
    if isinstance(value, (list, tuple)):
        rates = tuple(_check_rate(v, what) for v in value)
        return rates[0] if len(rates) == 1 else rates
    return _check_rate(value, what)


@dataclass(frozen=True)
class Configuration:
    """One pruned version: the fraction of attention heads and of linear weights removed (global or per block)."""

    attention: Rate
    linear: Rate

    def rate(self, kind: str, block: int) -> float:
        r = self.attention if kind in ATTENTION_UNITS else self.linear
        return r[block] if isinstance(r, tuple) else r

    @property
    def name(self) -> str:
        fmt = lambda r: "-".join(f"{x:g}" for x in r) if isinstance(r, tuple) else f"{r:g}"  # noqa: E731
        return f"a{fmt(self.attention)}_l{fmt(self.linear)}"

    def to_dict(self) -> dict:
        return {"attention": list(self.attention) if isinstance(self.attention, tuple) else self.attention,
                "linear": list(self.linear) if isinstance(self.linear, tuple) else self.linear, "name": self.name}


def parse_configurations(attention: Sequence[float | str], linear: Sequence[float | str], n: int | None = None,
                         grid: bool = False) -> list[Configuration]:
    """Pair `attention` and `linear` position by position (the seed's `-n N`), or take their cross product.

    Paired lists must have the same length, and N (when given) must equal it: a silent truncation would run
    configurations nobody asked for.
    """
    att = [parse_rate(a, "attention") for a in attention]
    lin = [parse_rate(x, "linear") for x in linear]
    if not att or not lin:
        raise PrunetuneError("give at least one attention rate and one linear rate")
    if grid:
        if n is not None and n != len(att) * len(lin):
            raise PrunetuneError(f"-n {n} does not match the grid of {len(att)} x {len(lin)} = "
                                 f"{len(att) * len(lin)} configurations")
        pairs = list(itertools.product(att, lin))
    else:
        if len(att) != len(lin):
            raise PrunetuneError(f"--attention has {len(att)} rates but --linear has {len(lin)}: pair them one to "
                                 "one, or use --grid for every combination")
        if n is not None and n != len(att):
            raise PrunetuneError(f"-n {n} does not match the {len(att)} rates given to --attention and --linear")
        pairs = list(zip(att, lin))
    out: list[Configuration] = []
    for a, li in pairs:
        c = Configuration(a, li)
        if c not in out:
            out.append(c)
    return out


# ------------------------------------------------------------------------------------------ units and plan
@dataclass(frozen=True)
class Unit:
    """One module of one block pruned one way: the thing fine-tuned once and shared by configurations."""

    block: int
    kind: str  # attention | cross-attention | o | co | gate | up | down
    criterion: str
    rate: float

    @property
    def id(self) -> str:
        return f"b{self.block}.{self.kind}.{self.criterion}.{self.rate:g}"


@dataclass
class Plan:
    """Unique units, and for each configuration which units it is made of."""

    configs: list[Configuration]
    units: list[Unit]
    members: dict[str, list[Unit]]  # configuration name -> its units
    unit_count_without_dedup: int

    def to_dict(self) -> dict:
        return {"configurations": [c.to_dict() for c in self.configs], "unique_units": len(self.units),
                "units_without_dedup": self.unit_count_without_dedup,
                "units": [u.id for u in self.units],
                "members": {k: [u.id for u in v] for k, v in self.members.items()}}


def check_units(units: Iterable[str], what: str, allowed: Sequence[str]) -> tuple[str, ...]:
    units = tuple(units)
    for u in units:
        if u not in allowed:
            raise PrunetuneError(f"unknown module role '{u}' in {what}; choose from: {', '.join(allowed)}")
    return units


def plan(configs: Sequence[Configuration], adapter: ArchAdapter, *,
         attention_units: Sequence[str] = DEFAULT_ATTENTION_UNITS, linear_units: Sequence[str] = DEFAULT_LINEAR_UNITS,
         attention_criterion: str = "l1", linear_criterion: str = "l1") -> Plan:
    """Deduplicate every configuration's (block, module, criterion, rate) into the units to fine-tune."""
    attention_units = check_units(attention_units, "the attention modules", tuple(ATTENTION_UNITS))
    linear_units = check_units(linear_units, "the linear modules", LINEAR_ROLES)
    check_head_criterion(attention_criterion)
    check_linear_criterion(linear_criterion)
    blocks = adapter.blocks()
    for c in configs:
        for what, r in (("attention", c.attention), ("linear", c.linear)):
            if isinstance(r, tuple) and len(r) != len(blocks):
                raise PrunetuneError(f"configuration {c.name}: {len(r)} per-block {what} rates for a model with "
                                     f"{len(blocks)} blocks")
    units: list[Unit] = []
    seen: set[Unit] = set()
    members: dict[str, list[Unit]] = {}
    total = 0
    for c in configs:
        mine: list[Unit] = []
        for b in blocks:
            kinds = [k for k in attention_units if all(r in b.linears for r in ATTENTION_UNITS[k])]
            kinds += [k for k in linear_units if k in b.linears]
            for kind in kinds:
                rate = c.rate(kind, b.index)
                if rate == 0.0:
                    continue  # left dense: the original module, nothing to fine-tune
                crit = attention_criterion if kind in ATTENTION_UNITS else linear_criterion
                u = Unit(b.index, kind, crit, rate)
                mine.append(u)
                total += 1
                if u not in seen:
                    seen.add(u)
                    units.append(u)
        members[c.name] = mine
    return Plan(list(configs), units, members, total)


# ------------------------------------------------------------------------------------------ settings, hashes
@dataclass(frozen=True)
class ModuleFTSettings:
    """Module-level fine-tuning settings; every field is part of the cache key."""

    linear_steps: int = 150
    linear_lr: float = 1e-3
    attention_steps: int = 60
    attention_lr: float = 5e-4
    attention_batch: int = 8  # sequences per attention-unit step
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def tensor_hash(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes()
                 if t.dtype != torch.bool else t.cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def model_hash(model: nn.Module) -> str:
    """Hash of every weight (name, shape, bytes): a cache entry can only ever be reused for the same model."""
    return tensor_hash(sorted(unwrap(model).state_dict().items()))


def data_hash(batches: Sequence[dict]) -> str:
    return tensor_hash((f"{i}.{k}", v) for i, b in enumerate(batches) for k, v in sorted(b.items())
                       if isinstance(v, torch.Tensor))


def default_cache_dir() -> Path:
    from prunetune.models.loading import cache_dir

    return cache_dir() / "composable"


class ModuleCache:
    """Fine-tuned units on disk: `<key>.safetensors` (weights + masks) and `<key>.json` (what the key hashes)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def key(self, unit: Unit, model_h: str, data_h: str, settings: ModuleFTSettings) -> tuple[str, dict]:
        meta = {"format": CACHE_FORMAT, "model": model_h, "data": data_h, "unit": asdict(unit),
                "settings": settings.to_dict()}
        return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24], meta

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        p = self.path(key)
        if not (p.is_file() and p.with_suffix(".json").is_file()):
            self.misses += 1
            return None
        try:
            out = load_file(str(p))
        except Exception:  # a torn or foreign file is a miss, never a crash
            self.misses += 1
            return None
        self.hits += 1
        return out

    def put(self, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        p = self.path(key)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "prunetune-composable-unit"})
        os.replace(tmp, p)
        tmp_meta = p.with_name(f".{p.stem}.{os.getpid()}.json.tmp")
        tmp_meta.write_text(json.dumps(meta, indent=2, default=str))
        os.replace(tmp_meta, p.with_suffix(".json"))
        return p


# ------------------------------------------------------------------------------------------ capture
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


def _first(x: Any) -> torch.Tensor:
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
            out = _first(output).detach()
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


# ------------------------------------------------------------------------------------------ unit training
def _registry_criterion(name: str):
    """The criterion registry's entry (`pruning.criteria.get_criterion`), or None for a name it does not know."""
    try:
        return get_criterion(name)
    except PrunetuneError:
        return None


def _scores_linear(crit) -> bool:
    """A score (not a weight update) from the weights or input column norms: what the module capture holds."""
    return not crit.updates_weights and crit.statistics in ("none", "column_norms")


def check_linear_criterion(name: str) -> str:
    """Any registry criterion that scores weights from the weights alone or from input column norms (the module
    capture has both; a weight-updating criterion such as SparseGPT is not a score)."""
    crit = _registry_criterion(name)
    if crit is None or not _scores_linear(crit):
        allowed = ["l1"] + [n for n in criterion_names() if _scores_linear(CRITERIA[n])]
        raise PrunetuneError(f"unknown or unsupported linear criterion '{name}'; choose one of: {', '.join(allowed)}")
    return name


def linear_criterion_needs_activations(name: str) -> bool:
    """Whether the linear criterion scores from input activations (wanda, column-norm criteria): the control
    arm (`baseline`, pruned without module-level fine-tuning) captures none, so it cannot use such a one."""
    if name == "wanda":
        return True
    crit = _registry_criterion(name)
    return crit is not None and crit.statistics == "column_norms"


def _has_element_importance(crit) -> bool:
    return type(crit).element_importance is not Criterion.element_importance


def check_head_criterion(name: str) -> str:
    """A registry criterion that scores a head from its weights alone (l1: |W|, l2: W²)."""
    crit = _registry_criterion(name)
    if crit is None or not _has_element_importance(crit):
        raise PrunetuneError(f"unknown head criterion '{name}'; choose one of: l1, l2")
    return name


class _GramColumnNorms:
    """Column-norm statistics read off the capture's Gram diagonal (what `column_norms` criteria consume)."""

    def __init__(self, gram: torch.Tensor) -> None:
        self.sq_sum = gram.diagonal()[:-1].clamp_min(0).double()
        self.tokens = int(gram[-1, -1])

    def norms(self) -> torch.Tensor:
        return self.sq_sum.sqrt().float()


def _linear_scores(criterion: str, w: torch.Tensor, gram: torch.Tensor | None, n: int) -> torch.Tensor:
    """The registry criterion's scores; column norms (Wanda's ‖X_j‖₂) are read off the capture's Gram diagonal."""
    crit = _registry_criterion(criterion)
    if crit is None or not _scores_linear(crit):
        check_linear_criterion(criterion)
    if crit.statistics == "column_norms" and gram is None:
        raise PrunetuneError(f"criterion '{criterion}' needs activations: it has no prune-only baseline here")
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
                      settings: ModuleFTSettings) -> tuple[dict[str, torch.Tensor], dict]:
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
    opt = torch.optim.Adam([param], lr=settings.linear_lr)
    curve = [before]
    for step in range(settings.linear_steps):
        with torch.no_grad():
            delta = param - target
            prod = delta @ g
            param.grad = (2.0 / w0.shape[0]) * prod * full_mask  # d/dŴ of tr(ΔŴ G ΔŴᵀ)/d_out, masked
            if step % 10 == 0 or step == settings.linear_steps - 1:
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
                         calls: list, settings: ModuleFTSettings) -> tuple[dict[str, torch.Tensor], dict]:
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
                out = _first(work(*a, **kw))
                tot += float(((out - target)[valid] ** 2).sum())
                cnt += int(valid.sum()) * target.shape[-1]
            return tot / max(cnt, 1)

    before = eval_mse()
    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.Adam(params, lr=settings.attention_lr)
    curve = [before]
    for step in range(settings.attention_steps):
        i = int(torch.randint(len(calls), (1,), generator=gen))
        a, kw, target, valid = calls[i]
        loss = _sub_mse(_first(work(*a, **kw)), target, valid)
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


def _unit_roles(unit: Unit) -> tuple[str, ...]:
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


def train_units(model: nn.Module, batches: Sequence[dict], units: Sequence[Unit], settings: ModuleFTSettings,
                cache: ModuleCache | None = None, *, finetune: bool = True,
                progress: Callable[[str], None] | None = None) -> UnitResults:
    """Prune (and with `finetune`, fine-tune) every unit once; one activation capture per block for all its
    missing units. With `finetune=False` the units are just pruned (the baseline's starting point; no cache)."""
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
            key, meta = cache.key(u, m_h, d_h, settings)
            keys[u.id] = (key, meta)
            hit = cache.get(key)
            res.timings["load_s"] += time.perf_counter() - t0
            if hit is not None:
                res.tensors[u.id] = hit
                res.cached.append(u.id)
                res.stats[u.id] = {"cached": True}
                continue
        todo.setdefault(u.block, []).append(u)
    torch.manual_seed(settings.seed)
    if not finetune:
        for bi in sorted(todo):
            for u in todo[bi]:
                res.tensors[u.id] = _prune_only(adapter, blocks[bi], u)
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
                tensors, stats = train_attention_unit(model, adapter, block, u, cap.attention[u.kind], settings)
            else:
                lin = block.linears[u.kind]
                n = int(cap.gram[u.kind][-1, -1])  # the ones column counts the tokens this input saw
                t, stats = train_linear_unit(lin, u, cap.gram[u.kind], n, settings)
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
def _prune_only(adapter: ArchAdapter, block: Block, unit: Unit) -> dict[str, torch.Tensor]:
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
    mask = unstructured_mask(_linear_scores(unit.criterion, lin.weight, None, 0), unit.rate, "layer")
    out = {f"{unit.kind}.weight": lin.weight.detach() * mask, f"{unit.kind}.mask": mask}
    if lin.bias is not None:
        out[f"{unit.kind}.bias"] = lin.bias.detach().clone()
    return out


# ------------------------------------------------------------------------------------------ compose
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
        for r in _unit_roles(u):
            lin = block.linears[r]
            lin.weight.copy_(t[f"{r}.weight"])
            if lin.bias is not None and f"{r}.bias" in t:
                lin.bias.copy_(t[f"{r}.bias"])
            masks[adapter.name_of(lin)] = t[f"{r}.mask"]
    masks.apply(out)
    return out, masks


class ComposedStart:
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


def _as_method(cls: type) -> type:
    """Make `ComposedStart` a `methods.base.Method` subclass (kept lazy so importing this module stays light)."""
    from prunetune.methods.base import Method

    return type(cls.__name__, (cls, Method), {"__doc__": cls.__doc__})


ComposedStart = _as_method(ComposedStart)


# ------------------------------------------------------------------------------------------ data
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


# ------------------------------------------------------------------------------------------ model-level FT
def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class ValidationClock(_callback_base()):
    """Times optimizer steps and checks validation accuracy at given steps; stops once it reaches `target`.

    The clock counts what a run needs: its steps and, when it stops on a target, the checks that decided it.
    Checks taken only to draw a curve (no target) are timed apart (`curve_eval_s`).
    """

    def __init__(self, tokenizer, examples: Sequence[dict], max_length: int, check_steps: Iterable[int],
                 target: float | None = None) -> None:
        self.tok, self.examples, self.max_length = tokenizer, list(examples), max_length
        self.check_steps = set(check_steps)
        self.target = target
        self.step_s = 0.0
        self.eval_s = 0.0
        self.points: list[dict] = []  # step, accuracy, clock
        self.reached_at: int | None = None
        self._t0: float | None = None

    def accuracy(self, model) -> float:
        from prunetune.evaluation.task import predict_classes

        preds = predict_classes(model, self.tok, [e["text"] for e in self.examples], self.max_length,
                                progress=False)
        return sum(int(p == e["label"]) for p, e in zip(preds, self.examples)) / len(self.examples)

    def clock(self) -> float:
        return self.step_s + (self.eval_s if self.target is not None else 0.0)

    def check(self, model, step: int) -> bool:
        t = time.perf_counter()
        acc = self.accuracy(model)
        self.eval_s += time.perf_counter() - t
        self.points.append({"step": step, "accuracy": acc, "clock_s": self.clock()})
        if self.target is not None and acc >= self.target - 1e-9 and self.reached_at is None:
            self.reached_at = step
            return True
        return False

    def on_step_begin(self, args, state, control, **kw):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kw):
        if self._t0 is not None:
            self.step_s += time.perf_counter() - self._t0
            self._t0 = None
        if state.global_step in self.check_steps or state.global_step == state.max_steps:
            if self.check(model, state.global_step):
                control.should_training_stop = True
        return control

    def summary(self) -> dict:
        return {"step_s": self.step_s, "eval_s": self.eval_s, "clock_s": self.clock(), "target": self.target,
                "reached_at_step": self.reached_at, "points": self.points}


def geometric_checks(max_steps: int, first: int = 2) -> list[int]:
    """Check steps 2, 4, 8, ...: a run that reaches its target early pays few checks, a late one few more."""
    out, s = [], first
    while s < max_steps:
        out.append(s)
        s *= 2
    return out + [max_steps]


def save_composed(model: nn.Module, tokenizer, masks: MaskSet, out: Path | str, info: dict | None = None) -> Path:
    """A plain HF directory with the composed weights and their masks (what `finetune` loads and keeps)."""
    from prunetune.models.export import save_hf_dir

    return save_hf_dir(model, tokenizer, out, {"kind": "composed", **(info or {})},
                       extra=lambda tmp: masks.save(tmp))


# ------------------------------------------------------------------------------------------ the whole method
def run_composable(model_spec: str, out: Path | str, configs: Sequence[Configuration], tune: Any, *,
                   settings: ModuleFTSettings = ModuleFTSettings(),
                   attention_units: Sequence[str] = DEFAULT_ATTENTION_UNITS,
                   linear_units: Sequence[str] = DEFAULT_LINEAR_UNITS, attention_criterion: str = "l1",
                   linear_criterion: str = "l1", module_texts: int | None = 128, module_batch: int = 8,
                   baseline: bool = True, cache_dir: Path | str | None = None,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Plan, fine-tune the unique modules once (cached), compose every configuration and fine-tune it at
    model level (`tune`: a `tuning.config.TuneConfig`); with `baseline`, the same model-level fine-tuning from
    the pruned modules without module-level fine-tuning. Writes `out/<config>/{composed,baseline}/` and returns
    per-configuration metrics, validation curves and the compute time of both routes."""
    from prunetune.models.loading import load_model
    from prunetune.tuning.data import load_task_data
    from prunetune.tuning.finetune import finetune

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda msg: None)
    t_all = time.perf_counter()
    data = load_task_data(tune)
    loaded = load_model(model_spec, tune.task, label_names=data["label_names"])
    original, tok = loaded.model, loaded.tokenizer
    adapter = get_adapter(original)
    pl = plan(configs, adapter, attention_units=attention_units, linear_units=linear_units,
              attention_criterion=attention_criterion, linear_criterion=linear_criterion)
    say(f"{len(pl.configs)} configurations -> {len(pl.units)} unique modules "
        f"({pl.unit_count_without_dedup} without deduplication)")
    texts = [e["text"] for e in data["train"]][: module_texts or None]
    batches = text_batches(tok, texts, tune.max_length, module_batch)
    cache = ModuleCache(cache_dir if cache_dir is not None else out / "module-cache")
    t0 = time.perf_counter()
    results = train_units(original, batches, pl.units, settings, cache, progress=say)
    module_s = time.perf_counter() - t0
    steps_per_epoch = max(1, math.ceil(len(data["train"]) / tune.batch_size))
    max_steps = max(1, math.ceil(tune.epochs * steps_per_epoch))
    checks = geometric_checks(max_steps)
    rows: list[dict] = []
    arms = [("composed", True)] + ([("baseline", False)] if baseline else [])
    for c in pl.configs:
        row: dict = {"config": c.to_dict()}
        for arm, module_ft in arms:
            t0 = time.perf_counter()
            if module_ft:
                model, masks = compose(original, pl.members[c.name], results)
            else:
                pruned = train_units(original, [], pl.members[c.name], settings, None, finetune=False)
                model, masks = compose(original, pl.members[c.name], pruned)
            build_s = time.perf_counter() - t0
            d = out / c.name / arm
            save_composed(model, tok, masks, d / "start", {"configuration": c.to_dict(), "module_ft": module_ft})
            clock = ValidationClock(tok, data["validation"], tune.max_length, checks)
            start_acc = clock.accuracy(model) if tune.task == "seq-cls" else None
            say(f"{c.name} {arm}: model-level fine-tuning ({max_steps} steps)")
            r = finetune(str(d / "start"), copy.deepcopy(tune), d / "tuned", overwrite=True, callbacks=(clock,),
                         kind=f"compose-{arm}")
            import shutil

            shutil.rmtree(d / "tuned" / "checkpoints", ignore_errors=True)
            row[arm] = {"start_val_accuracy": start_acc, "build_s": build_s, "step_s": clock.step_s,
                        "points": [{"step": 0, "accuracy": start_acc}] + clock.points,
                        "accuracy": r.get("accuracy"), "macro_f1": r.get("macro_f1"),
                        "test": r.get("test_after_merge"), "sparsity": r.get("sparsity"),
                        "train_loss": r.get("train_loss"), "log": str(d / "tuned" / "train_log.csv"),
                        "model": str(d / "tuned" / "model")}
        rows.append(row)
    composed_s = module_s + sum(r["composed"]["build_s"] + r["composed"]["step_s"] for r in rows)
    summary = {"plan": pl.to_dict(), "modules": {**results.summary(), "wall_s": module_s,
                                                  "cache": {"hits": cache.hits, "misses": cache.misses,
                                                            "dir": str(cache.root)}},
               "settings": settings.to_dict(), "rows": rows,
               "compute_s": {"with_composability": composed_s, "module_ft": module_s,
                             "without_composability": (sum(r["baseline"]["build_s"] + r["baseline"]["step_s"]
                                                           for r in rows) if baseline else None)},
               "protocol": {"model_ft_steps": max_steps, "checks": checks, "validation": len(data["validation"]),
                            "test": len(data["test"]), "texts_captured": len(texts)},
               "wall_s": time.perf_counter() - t_all}
    (out / "composable.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def run_composable_seq2seq(model_spec: str, out: Path | str, configs: Sequence[Configuration], tune: Any, *,
                           settings: ModuleFTSettings = ModuleFTSettings(), module_texts: int | None = 128,
                           module_batch: int = 8, baseline: bool = True, cache_dir: Path | str | None = None,
                           **plan_kw: Any) -> dict:
    """The same method for an encoder-decoder (T5 translation): module-level FT captures the encoder and the
    decoder on (source, target) pairs, and model-level fine-tuning is `tuning.seq2seq.finetune_seq2seq`
    (`tune`: a `Seq2SeqConfig`) with BLEU on the test pairs, per configuration, with and without module FT."""
    from prunetune.models.loading import load_model
    from prunetune.tuning.seq2seq import finetune_seq2seq, load_pairs, split_pairs

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(model_spec, "seq2seq")
    original, tok = loaded.model, loaded.tokenizer
    pl = plan(configs, get_adapter(original), **plan_kw)
    pairs = split_pairs(load_pairs(tune.data, tune.seed, n=max(50, int((tune.n_samples or 400) / 0.8) + 2)))["train"]
    pairs = pairs[: module_texts or None]
    batches = text_batches(tok, [tune.prefix + p["source"] for p in pairs], tune.max_source_length, module_batch,
                           targets=[p["target"] for p in pairs])
    cache = ModuleCache(cache_dir if cache_dir is not None else out / "module-cache")
    t0 = time.perf_counter()
    results = train_units(original, batches, pl.units, settings, cache)
    module_s = time.perf_counter() - t0
    rows = []
    for c in pl.configs:
        row: dict = {"config": c.to_dict()}
        for arm, module_ft in [("composed", True)] + ([("baseline", False)] if baseline else []):
            t0 = time.perf_counter()
            res = results if module_ft else train_units(original, [], pl.members[c.name], settings, None,
                                                        finetune=False)
            model, masks = compose(original, pl.members[c.name], res)
            build_s = time.perf_counter() - t0
            r = finetune_seq2seq(model, tok, copy.deepcopy(tune), out / c.name / arm, masks=masks)
            row[arm] = {"build_s": build_s, "train_s": r["timings"]["train_s"], "bleu": r["bleu"],
                        "loss": r["loss"], "start": r["before"], "train_loss": r["train_loss"],
                        "log": str(out / c.name / arm / "train_log.csv")}
            row[arm]["start"] = {k: v for k, v in r["before"].items() if k != "examples"}
        rows.append(row)
    summary = {"plan": pl.to_dict(), "modules": {**results.summary(), "wall_s": module_s}, "rows": rows,
               "settings": settings.to_dict(), "tune": asdict(tune)}
    (out / "composable.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
