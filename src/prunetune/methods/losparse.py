"""LoSparse: every targeted weight becomes a low-rank part plus a sparse part, W ≈ U·V + S, pruned while tuning.

Why two parts: at 10–20 % of a layer's parameters, pruning alone deletes the coherent directions every input
uses, and a low-rank factor alone loses the incoherent detail. LoSparse keeps the top singular directions in
U·V and lets PLATON prune S, the residual, during fine-tuning (Li et al. 2023, "LoSparse"; Zhang et al. 2022,
"PLATON"). U, V and S all train.

The pieces, each usable alone:

- `rank_for(m, n, p)`: r = ⌈p·m·n / (m + n)⌉ — U and V then hold about the fraction p of the m×n weight.
- `LowRankSparseLinear`: y = x·Vᵀ·Uᵀ + x·Sᵀ + b, initialised from a Linear's truncated SVD (U = U_r·√Σ_r,
  V = √Σ_r·V_rᵀ, S = W − U·V). S is stored as the module's `weight`, so the shared tools that address a
  Linear's weight (`MaskSet`, `sparsity_report`, the driver's mask enforcement) see the sparse part.
- `PlatonScores`: sensitivity I = |θ·∇θ|, Ī = EMA_β1(I), Ū = EMA_β2(|I − Ī|), score Ī·Ū (updated at every
  optimizer step; the seed averaged I over a window of `deltaT` steps between EMA updates — here the EMAs see
  every step and `deltaT` is only how often the mask is recomputed).
- `LosparseSchedule`: the seed's cubic schedule of the kept fraction of S. Warm-ups are in units of
  `warmup_steps` (the seed's `initial_warmup` / `final_warmup`) or, when given, plain step counts
  (`initial_warmup_steps` / `final_warmup_steps`).
- `select_keep`: scores → keep-mask over all targeted S together (one global budget, as in the seed), per
  entry (unstructured) or per row / column (`structured_method` mean|sum|max|min pools the entry scores).
- `Losparse(Method)`: the lifecycle glue: prepare swaps the layers, after_step scores and prunes (after
  `optimizer.step()`, before `zero_grad()`; before the step Adam would revive what was just pruned),
  extra_loss distils from a dense teacher, finalize materialises W' = U·V + S⊙M, and `state_dict` /
  `load_state_dict` carry the PLATON averages, the schedule's step and the fixed mask through every training
  checkpoint (`--resume` continues mid-stage exactly as the uninterrupted run would).

While the cubic schedule runs, each recomputed mask may keep an entry an earlier one pruned (its EMA score
decides; that is PLATON). Once the final warm-up begins the mask is computed one last time at exactly
`final_threshold`, added to the run's `MaskSet` and enforced after every step: pruned entries are exactly zero
from then on, through both exports.

Exports (`save_factorized`, `load_factorized`; `prunetune.load_model(dir)` dispatches to the latter on the
`losparse.json` marker): the factorised form stores U, V, the bias and only the kept part of S (kept columns
or rows with their indices, or CSR for unstructured), so it is smaller and — at small rank and kept fraction —
faster than dense; the materialised form is a plain HF directory any transformers loads.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.methods.base import Method, MethodContext
from prunetune.models.factorized import FactorizedLinear, set_module as _set_module
from prunetune.pruning.masks import MaskSet

DEFAULT_ROLES = ("q", "k", "v", "o", "gate", "up", "down", "cq", "ck", "cv", "co")
STRUCTURED_METHODS = ("mean", "sum", "max", "min")
DIRECTIONS = ("row", "col", "row_col")


# ------------------------------------------------------------------------------------------------ rank
def rank_for(m: int, n: int, ratio: float) -> int:
    """The seed's rank: U (m×r) and V (r×n) together hold about `ratio` of the m·n weight's parameters."""
    if not 0.0 < ratio < 1.0:
        raise PrunetuneError(f"--rank-ratio (low_rank_parameter_ratio) must be in (0, 1), got {ratio}")
    return max(1, math.ceil(ratio * m * n / (m + n)))


def check_rank(rank: int, m: int, n: int, name: str = "layer") -> None:
    if rank < 1 or rank > min(m, n):
        raise PrunetuneError(f"rank {rank} is impossible for {name} ({m}×{n}): it must be in [1, {min(m, n)}]")


# ------------------------------------------------------------------------------------------------ module
class LowRankSparseLinear(nn.Module):
    """y = x·(U·V + S)ᵀ + b, computed as two thin products plus the sparse one (never forming U·V).

    `weight` is S (the sparse part); `U` is out×r, `V` is r×in.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_rank(rank, out_features, in_features)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.U = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))
        self.V = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype))
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int, name: str = "layer") -> LowRankSparseLinear:
        """Truncated-SVD initialisation (in float64 for the decomposition, stored in the layer's dtype)."""
        w = linear.weight.detach()
        m, n = w.shape
        check_rank(rank, m, n, name)
        mod = cls(n, m, rank, bias=linear.bias is not None, dtype=w.dtype).to(w.device)
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        root = s[:rank].sqrt()
        U = u[:, :rank] * root
        V = root[:, None] * vh[:rank]
        mod.U.copy_(U)
        mod.V.copy_(V)
        mod.weight.copy_(w.double() - U @ V)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.V), self.U, self.bias) + F.linear(x, self.weight)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        return self.U @ self.V + self.weight

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """The materialised layer W' = U·V + S (S already carries its mask's zeros)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        dtype=self.weight.dtype, device=self.weight.device)
        lin.weight.copy_(self.dense_weight())
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


# ------------------------------------------------------------------------------------------------ PLATON
class PlatonScores:
    """Ī and Ū per scored tensor; `update` after each optimizer step, `score` = Ī·Ū.

    I = |θ·∇θ| uses the weights after the step and the gradient that produced it, as in the seed.
    """

    def __init__(self, beta1: float = 0.85, beta2: float = 0.95) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.avg: dict[str, torch.Tensor] = {}
        self.unc: dict[str, torch.Tensor] = {}
        self.updates = 0

    @torch.no_grad()
    def update(self, params: dict[str, nn.Parameter]) -> None:
        for name, p in params.items():
            if p.grad is None:
                continue
            ipt = (p.detach() * p.grad.detach()).abs().float()
            if name not in self.avg:
                self.avg[name] = torch.zeros_like(ipt)
                self.unc[name] = torch.zeros_like(ipt)
            avg = self.avg[name].mul_(self.beta1).add_(ipt, alpha=1 - self.beta1)
            self.unc[name].mul_(self.beta2).add_((ipt - avg).abs_(), alpha=1 - self.beta2)
        self.updates += 1

    def score(self, name: str) -> torch.Tensor:
        return self.avg[name] * self.unc[name]


def _pool(score: torch.Tensor, method: str, dim: int) -> torch.Tensor:
    if method == "mean":
        return score.mean(dim)
    if method == "sum":
        return score.sum(dim)
    if method == "max":
        return score.amax(dim)
    return score.amin(dim)


def unit_direction(direction: str, role: str) -> str:
    """rows or cols of S for a layer. The seed's `row_col` prunes rows of q/k/v and columns of the others."""
    if direction == "row_col":
        return "row" if role in ("q", "k", "v", "cq", "ck", "cv") else "col"
    return direction


@torch.no_grad()
def select_keep(scores: dict[str, torch.Tensor], keep: float, structured_method: str | None = None,
                directions: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Keep-masks over all `scores` together: the highest-scoring units holding `keep` of all entries.

    Unstructured: exactly round(keep·N) entries (ties broken by position, so the count is exact). Structured:
    each row (or column) is one unit scored by pooling its entries; units are taken best-first while they fit
    in the budget, so the kept fraction is `keep` up to one unit.
    """
    names = list(scores)
    total = sum(scores[n].numel() for n in names)
    budget = int(round(keep * total))
    if structured_method is None:
        flat = torch.cat([scores[n].reshape(-1) for n in names])
        keep_flat = torch.zeros(total, dtype=torch.bool, device=flat.device)
        if budget > 0:
            keep_flat[torch.topk(flat, budget, sorted=False).indices] = True
        out, off = {}, 0
        for n in names:
            k = scores[n].numel()
            out[n] = keep_flat[off : off + k].view_as(scores[n])
            off += k
        return out
    directions = directions or {}
    unit_scores, unit_sizes, owners = [], [], []
    for i, n in enumerate(names):
        s = scores[n]
        d = directions.get(n, "row")
        pooled = _pool(s, structured_method, 1 if d == "row" else 0)
        unit_scores.append(pooled)
        unit_sizes.append(torch.full_like(pooled, s.shape[1] if d == "row" else s.shape[0]))
        owners.append(torch.full(pooled.shape, i, dtype=torch.long, device=pooled.device))
    us, sz = torch.cat(unit_scores), torch.cat(unit_sizes)
    order = torch.argsort(us, descending=True, stable=True)
    fits = torch.cumsum(sz[order], 0) <= budget
    chosen = torch.zeros_like(us, dtype=torch.bool)
    chosen[order[fits]] = True
    out, off = {}, 0
    for i, n in enumerate(names):
        k = unit_scores[i].numel()
        units = chosen[off : off + k]
        off += k
        if directions.get(n, "row") == "row":
            out[n] = units[:, None].expand_as(scores[n]).clone()
        else:
            out[n] = units[None, :].expand_as(scores[n]).clone()
    return out


# ------------------------------------------------------------------------------------------------ schedule
@dataclass
class LosparseSchedule:
    """The seed's cubic schedule of the kept fraction of S over optimizer steps t = 1..total_steps.

    t ≤ iw: keep `initial_threshold` (plain fine-tuning, no pruning); iw < t ≤ T − fw: cubic decay
    keep(t) = f + (i − f)·(1 − (t − iw)/(T − iw − fw))³, a mask every `deltaT` steps; t > T − fw: `final_threshold`
    exactly, the mask fixed.
    """

    total_steps: int
    initial_warmup_steps: int
    final_warmup_steps: int
    final_threshold: float
    initial_threshold: float = 1.0
    deltaT: int = 10

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise PrunetuneError(f"LoSparse needs at least one training step, got {self.total_steps}")
        if self.initial_warmup_steps < 0 or self.final_warmup_steps < 0:
            raise PrunetuneError("LoSparse warm-ups must be >= 0 steps")
        if self.initial_warmup_steps + self.final_warmup_steps >= self.total_steps:
            raise PrunetuneError(
                f"LoSparse warm-ups ({self.initial_warmup_steps} initial + {self.final_warmup_steps} final steps) "
                f"leave no pruning steps in {self.total_steps} training steps: shorten them or train longer")

    @property
    def fix_step(self) -> int:
        """The first step of the final warm-up (mask computed at final_threshold and frozen)."""
        return self.total_steps - self.final_warmup_steps + 1

    def at(self, t: int) -> tuple[float, bool]:
        """(kept fraction, whether to recompute the mask) after optimizer step t."""
        iw, T = self.initial_warmup_steps, self.total_steps
        if t <= iw:
            return self.initial_threshold, False
        if t >= self.fix_step:
            return self.final_threshold, t == self.fix_step
        span = T - iw - self.final_warmup_steps
        frac = 1.0 - (t - iw) / span
        keep = self.final_threshold + (self.initial_threshold - self.final_threshold) * frac**3
        return keep, t % self.deltaT == 0


# ------------------------------------------------------------------------------------------------ spec
@dataclass
class LosparseSpec:
    """LoSparse settings. Seed names in brackets are accepted as aliases by the CLI and `from_dict`."""

    rank_ratio: float = 0.1  # [low_rank_parameter_ratio] fraction of each matrix kept in U and V
    keep: float = 0.1  # [final_threshold] fraction of S's entries kept at the end
    initial_threshold: float = 1.0  # kept fraction of S before pruning starts
    warmup_steps: int = 10  # the seed's unit of initial_warmup / final_warmup
    initial_warmup: float = 1.0  # in units of warmup_steps
    final_warmup: float = 5.0  # in units of warmup_steps
    initial_warmup_steps: int | None = None  # plain step count; overrides initial_warmup
    final_warmup_steps: int | None = None  # plain step count; overrides final_warmup
    deltaT: int = 10  # recompute the mask every deltaT steps while the schedule runs
    beta1: float = 0.85
    beta2: float = 0.95
    structured_method: str | None = None  # mean|sum|max|min (rows/cols of S); None = unstructured
    structured_direction: str = "row"  # row|col|row_col
    roles: tuple[str, ...] = DEFAULT_ROLES
    teacher: str | None = None  # dense fine-tuned teacher dir for distillation (None: no distillation)
    kd_weight: float = 0.0  # weight of T²·KL(teacher || student) on logits
    kd_temp: float = 2.0
    layer_weight: float = 0.0  # weight of the mean layer-output MSE

    ALIASES = {"low_rank_parameter_ratio": "rank_ratio", "final_threshold": "keep", "delta_t": "deltaT"}

    def validate(self) -> LosparseSpec:
        if not 0.0 < self.rank_ratio < 1.0:
            raise PrunetuneError(f"--rank-ratio (low_rank_parameter_ratio) must be in (0, 1), got {self.rank_ratio}")
        if not 0.0 < self.keep < 1.0:
            raise PrunetuneError(f"--keep (final_threshold) must be in (0, 1), got {self.keep}")
        if not self.keep <= self.initial_threshold <= 1.0:
            raise PrunetuneError(f"initial_threshold must be in [keep, 1], got {self.initial_threshold}")
        if self.warmup_steps < 0 or self.initial_warmup < 0 or self.final_warmup < 0:
            raise PrunetuneError("LoSparse warm-ups must be >= 0")
        if self.deltaT < 1:
            raise PrunetuneError(f"--delta-t (deltaT) must be >= 1, got {self.deltaT}")
        for b, v in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0.0 <= v < 1.0:
                raise PrunetuneError(f"--{b} must be in [0, 1), got {v}")
        if self.structured_method in ("none", "", "unstructured"):
            self.structured_method = None
        if self.structured_method is not None and self.structured_method not in STRUCTURED_METHODS:
            raise PrunetuneError(f"structured_method must be one of {', '.join(STRUCTURED_METHODS)} or none, "
                                 f"got '{self.structured_method}'")
        if self.structured_direction not in DIRECTIONS:
            raise PrunetuneError(f"structured_direction must be one of {', '.join(DIRECTIONS)}, "
                                 f"got '{self.structured_direction}'")
        if self.kd_weight < 0 or self.layer_weight < 0 or not self.kd_temp > 0:
            raise PrunetuneError("distillation weights must be >= 0 and --kd-temp > 0")
        if (self.kd_weight > 0 or self.layer_weight > 0) and not self.teacher:
            raise PrunetuneError("LoSparse distillation (--kd-weight/--layer-weight) needs --teacher DIR")
        self.roles = tuple(self.roles)
        return self

    @classmethod
    def from_dict(cls, d: dict) -> LosparseSpec:
        known = {f for f in cls.__dataclass_fields__}
        out = {}
        for k, v in d.items():
            key = cls.ALIASES.get(k, k)
            if key not in known:
                raise PrunetuneError(f"unknown LoSparse option '{k}'")
            out[key] = v
        return cls(**out).validate()

    def schedule(self, total_steps: int) -> LosparseSchedule:
        iw = self.initial_warmup_steps if self.initial_warmup_steps is not None else \
            int(round(self.initial_warmup * self.warmup_steps))
        fw = self.final_warmup_steps if self.final_warmup_steps is not None else \
            int(round(self.final_warmup * self.warmup_steps))
        return LosparseSchedule(total_steps, iw, fw, self.keep, self.initial_threshold, self.deltaT)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["roles"] = list(self.roles)
        return d


# ------------------------------------------------------------------------------------------------ swapping
def targets(model: nn.Module, roles: tuple[str, ...] = DEFAULT_ROLES) -> dict[str, tuple[str, nn.Linear]]:
    """name -> (role, Linear) of the layers LoSparse replaces: attention and MLP projections only (the
    adapter never lists embeddings, norms, the pooler, the classifier or the LM head)."""
    from prunetune.models.arch import get_adapter

    return {n: (r, lin) for n, (r, lin) in get_adapter(model).linears().items()
            if r in roles and isinstance(lin, nn.Linear)}


def factorize(model: nn.Module, rank_ratio: float, roles: tuple[str, ...] = DEFAULT_ROLES,
              ranks: dict[str, int] | None = None) -> dict[str, dict]:
    """Swap every target Linear for an SVD-initialised LowRankSparseLinear, in place; returns layer facts."""
    from prunetune.models.arch import unwrap

    root = unwrap(model)
    found = targets(model, roles)
    if not found:
        raise PrunetuneError(f"no linear layer of roles {', '.join(roles)} to factorise in this model")
    info = {}
    for name, (role, lin) in found.items():
        m, n = lin.weight.shape
        r = (ranks or {}).get(name) or rank_for(m, n, rank_ratio)
        _set_module(root, name, LowRankSparseLinear.from_linear(lin, r, name))
        info[name] = {"role": role, "shape": [m, n], "rank": r}
    return info


def losparse_layers(model: nn.Module) -> dict[str, LowRankSparseLinear]:
    from prunetune.models.arch import unwrap

    return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, LowRankSparseLinear)}


@torch.no_grad()
def materialize(model: nn.Module, masks: MaskSet | None = None) -> nn.Module:
    """Replace every LowRankSparseLinear by a plain Linear W' = U·V + S⊙M, in place (any transformers loads it)."""
    from prunetune.models.arch import unwrap

    root = unwrap(model)
    for name, mod in losparse_layers(root).items():
        if masks is not None and name in masks:
            mod.weight.mul_(masks[name].to(mod.weight.device, mod.weight.dtype))
        _set_module(root, name, mod.to_linear())
    return root


def parameter_counts(model: nn.Module) -> dict:
    """Parameters of the factorised model: targeted linears (U, V, kept S, bias) against the original dense
    linears they replace, and the whole model. Indices of the sparse part are bookkeeping, not counted."""
    from prunetune.models.arch import parameter_count, unwrap

    root = unwrap(model)
    lowrank = kept_s = bias = dense = 0
    for mod in root.modules():
        if isinstance(mod, LowRankSparseLinear):
            lowrank += mod.U.numel() + mod.V.numel()
            kept_s += int(torch.count_nonzero(mod.weight))
        elif isinstance(mod, FactorizedLinear):
            lowrank += mod.U.numel() + mod.V.numel()
            kept_s += mod.kept_parameters() - mod.U.numel() - mod.V.numel() - (
                mod.bias.numel() if mod.bias is not None else 0)
        else:
            continue
        dense += mod.in_features * mod.out_features
        bias += mod.bias.numel() if mod.bias is not None else 0
    # a CSR part of S is a plain tensor, not a Parameter: count its values with what is stored
    total_stored = parameter_count(root) + sum(int(m.csr.values().numel()) for m in root.modules()
                                               if isinstance(m, FactorizedLinear) and m.csr is not None)
    dense_s = sum(m.weight.numel() for m in root.modules() if isinstance(m, LowRankSparseLinear))
    zeros_s = dense_s - sum(int(torch.count_nonzero(m.weight)) for m in root.modules()
                            if isinstance(m, LowRankSparseLinear))
    total_effective = total_stored - zeros_s
    return {"linear_dense": dense, "lowrank": lowrank, "sparse_kept": kept_s, "linear_bias": bias,
            "linear_kept": lowrank + kept_s,
            "linear_kept_fraction": (lowrank + kept_s) / dense if dense else 0.0,
            "lowrank_fraction": lowrank / dense if dense else 0.0,
            "sparse_fraction": kept_s / dense if dense else 0.0,
            "model_params": total_effective,
            "model_params_dense_equivalent": total_effective - lowrank - kept_s + dense}


# ------------------------------------------------------------------------------------------------ method
class Losparse(Method):
    """The lifecycle glue (see the module docstring)."""

    name = "losparse"
    changes_base_weights = True

    def __init__(self, spec: LosparseSpec | None = None, teacher_model: nn.Module | None = None) -> None:
        self.spec = (spec or LosparseSpec()).validate()
        self.scores = PlatonScores(self.spec.beta1, self.spec.beta2)
        self.layers: dict[str, LowRankSparseLinear] = {}
        self.directions: dict[str, str] = {}
        self.layer_info: dict[str, dict] = {}
        self.schedule: LosparseSchedule | None = None
        self.fixed: MaskSet | None = None
        self.t = 0
        self.events: list[dict] = []
        self.teacher = teacher_model
        self._hooks: list = []
        self._student_acts: list[torch.Tensor] = []
        self._teacher_acts: list[torch.Tensor] = []
        self.counts: dict = {}
        self.factorized_dir: Path | None = None
        self.task = "seq-cls"

    # -- lifecycle ---------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        if model.__class__.__name__.startswith("Peft"):
            raise PrunetuneError("LoSparse trains U, V and S itself: run it without LoRA (full fine-tuning, --full)")
        self.schedule = self.spec.schedule(ctx.max_steps)  # raises on a warm-up longer than training
        self.task = ctx.task
        self.layer_info = factorize(model, self.spec.rank_ratio, self.spec.roles)
        self.layers = losparse_layers(model)
        self.directions = {n: unit_direction(self.spec.structured_direction, self.layer_info[n]["role"])
                           for n in self.layers}
        for mod in self.layers.values():
            for p in mod.parameters():
                p.requires_grad_(True)
        self.t = ctx.resumed_from or 0
        if self.spec.kd_weight > 0 or self.spec.layer_weight > 0:
            self._setup_teacher(model, ctx)
        return model

    def after_step(self, model: nn.Module, ctx: MethodContext) -> None:
        self.t += 1
        params = {n: m.weight for n, m in self.layers.items()}
        if self.fixed is not None:
            self._apply(self.fixed)
            return
        self.scores.update(params)
        keep, recompute = self.schedule.at(self.t)
        if not recompute:
            return
        masks = MaskSet(select_keep({n: self.scores.score(n) for n in params if n in self.scores.avg}, keep,
                                    self.spec.structured_method, self.directions))
        self._apply(masks)
        kept = sum(int(m.sum()) for _, m in masks.items()) / sum(m.numel() for _, m in masks.items())
        self.events.append({"step": self.t, "keep_target": keep, "kept": kept, "fixed": self.t >= self.schedule.fix_step})
        if self.t >= self.schedule.fix_step:
            self.fixed = masks
            ctx.masks.update(masks)  # the driver enforces it after every step and saves it with the export

    def extra_loss(self, model: nn.Module, inputs: dict, outputs: Any,
                   ctx: MethodContext) -> tuple[torch.Tensor | None, dict[str, float]]:
        if self.teacher is None or not model.training:
            self._student_acts.clear()
            return None, {}
        feats = {k: v for k, v in inputs.items() if k != "labels"}
        self._teacher_acts.clear()
        with torch.no_grad():
            t_out = self.teacher(**feats)
        loss = outputs.logits.new_zeros(())
        logs: dict[str, float] = {}
        if self.spec.kd_weight > 0:
            from prunetune.tuning.distill import kl_soft

            kl = kl_soft(outputs.logits, t_out.logits, self.spec.kd_temp)
            loss = loss + self.spec.kd_weight * self.spec.kd_temp**2 * kl
            logs["kd_kl"] = float(kl.detach())
        if self.spec.layer_weight > 0 and self._student_acts:
            mse = torch.stack([F.mse_loss(s.float(), t.float()) for s, t in zip(self._student_acts, self._teacher_acts)]).mean()
            loss = loss + self.spec.layer_weight * mse
            logs["layer_mse"] = float(mse.detach())
        self._student_acts.clear()
        self._teacher_acts.clear()
        return loss, logs

    def finalize(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """Write the factorised export to `ctx.out/factorized` (when the run has an output dir), then return the
        materialised model W' = U·V + S⊙M that the driver evaluates and exports as a plain HF dir.

        W' is dense (U·V fills every entry), so the S-masks are removed from the run's MaskSet: applied to W'
        they would zero entries that are not zero. S's zeros live on in the factorised export."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.fixed is not None:
            self._apply(self.fixed)
        self.counts = parameter_counts(model)
        if ctx.out is not None:
            self.factorized_dir = save_factorized(model, ctx.tokenizer, Path(ctx.out) / "factorized", self.spec,
                                                  task=ctx.task)
        plain = materialize(model)
        for n in list(self.layers):
            ctx.masks.masks.pop(n, None)
        return plain

    def summary(self) -> dict:
        return {"losparse": {"spec": self.spec.to_dict(), "steps_seen": self.t, "parameters": self.counts,
                             "factorized_dir": str(self.factorized_dir) if self.factorized_dir else None},
                "losparse_schedule": asdict(self.schedule) if self.schedule else None, "losparse_events": self.events,
                "losparse_mask_fixed": self.fixed is not None, "losparse_layers": self.layer_info}

    def to_dict(self) -> dict:
        return {"name": self.name, **self.spec.to_dict()}

    def state_dict(self) -> dict[str, Any]:
        """Everything `after_step` carries from one step to the next, so that a run resumed from a checkpoint
        ends exactly like an uninterrupted one: the step of the cubic schedule, the PLATON averages Ī and Ū of
        every S (restarting them would rank S on a few steps of evidence), the fixed mask once the final
        warm-up has begun, and the mask events so far (for the summary). The schedule is recorded to refuse a
        resume under other settings. Between mask events no other mask is in force: a pruned entry may come back
        (PLATON), so its zeros in S, saved with the weights, are the whole of it."""
        state: dict[str, Any] = {"t": self.t, "platon_updates": self.scores.updates, "events": self.events,
                                 "schedule": asdict(self.schedule) if self.schedule is not None else None,
                                 "fixed": sorted(self.fixed.names()) if self.fixed is not None else None}
        for n in self.scores.avg:
            state[f"platon_avg/{n}"] = self.scores.avg[n]
            state[f"platon_unc/{n}"] = self.scores.unc[n]
        for n in (self.fixed.names() if self.fixed is not None else ()):
            state[f"fixed_mask/{n}"] = self.fixed[n].to(torch.uint8)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.schedule is None:
            raise PrunetuneError("LoSparse: load_state_dict needs the prepared model (call prepare first)")
        if state.get("schedule") != asdict(self.schedule):
            raise PrunetuneError("--resume: the checkpoint's LoSparse schedule differs from this run's "
                                 f"({state.get('schedule')} vs {asdict(self.schedule)}): resume with the same settings")
        for key, v in state.items():
            if "/" in key and key.split("/", 1)[1] not in self.layers:
                raise PrunetuneError(f"--resume: the checkpoint's LoSparse state names layer "
                                     f"'{key.split('/', 1)[1]}', which this model does not factorise")
        self.t = int(state["t"])
        self.scores.updates = int(state["platon_updates"])
        self.events = [dict(e) for e in state["events"]]
        self.scores.avg, self.scores.unc = {}, {}
        for n, mod in self.layers.items():
            if f"platon_avg/{n}" in state:
                self.scores.avg[n] = state[f"platon_avg/{n}"].to(mod.weight.device, torch.float32)
                self.scores.unc[n] = state[f"platon_unc/{n}"].to(mod.weight.device, torch.float32)
        self.fixed = None
        if state["fixed"] is not None:
            self.fixed = MaskSet({n: state[f"fixed_mask/{n}"].to(self.layers[n].weight.device).bool()
                                  for n in state["fixed"]})

    # -- helpers -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _apply(self, masks: MaskSet) -> None:
        for n, mask in masks.items():
            w = self.layers[n].weight
            w.mul_(mask.to(w.device, w.dtype))

    def _setup_teacher(self, model: nn.Module, ctx: MethodContext) -> None:
        from prunetune.models.arch import get_adapter

        if self.teacher is None:
            from prunetune.models.loading import load_model

            # the student's labels (finetune loads it with the task data's label names) give the teacher's head
            label_names = ctx.extra.get("label_names") or _label_names(model, ctx.task)
            self.teacher = load_model(self.spec.teacher, ctx.task, label_names=label_names).model
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if self.spec.layer_weight > 0:
            s_blocks, t_blocks = get_adapter(model).blocks(), get_adapter(self.teacher).blocks()
            if len(s_blocks) != len(t_blocks):
                raise PrunetuneError(f"layer distillation needs a teacher with as many blocks as the student "
                                     f"({len(t_blocks)} vs {len(s_blocks)})")

            def grab(store: list):
                def hook(_m, _i, out):
                    store.append(out[0] if isinstance(out, tuple) else out)
                return hook

            for b in s_blocks:
                self._hooks.append(b.module.register_forward_hook(grab(self._student_acts)))
            for b in t_blocks:
                self._hooks.append(b.module.register_forward_hook(grab(self._teacher_acts)))


def _label_names(model: nn.Module, task: str) -> list[str] | None:
    """The label names of a classification model's config, in id order (None for other tasks)."""
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if task != "seq-cls" or not id2label:
        return None
    return [id2label[i] for i in sorted(id2label, key=int)]


# ------------------------------------------------------------------------------------------------ export
@torch.no_grad()
def save_factorized(model: nn.Module, tokenizer: Any, out: Path | str, spec: LosparseSpec | None = None,
                    task: str = "seq-cls", manifest: dict | None = None) -> Path:
    """The factorised export (format in `models/factorized.py`): U, V, bias and only the kept part of S.

    Structured S is stored as its kept columns or rows (whichever is smaller) with their indices, so the
    forward pass multiplies by a narrow dense block; unstructured S is stored as CSR. Load it with
    `prunetune.load_model(dir)`.
    """
    from prunetune.models.arch import unwrap
    from prunetune.models.factorized import write_factorized

    root = unwrap(model)
    layers = losparse_layers(root)
    if not layers:
        raise PrunetuneError("save_factorized: the model holds no LoSparse layers")
    structured = spec.structured_method if spec is not None else None
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    desc: dict[str, dict] = {}
    for name, mod in layers.items():
        S = mod.weight.detach()
        nz = S != 0
        rows, cols = nz.any(1), nz.any(0)
        t = {"U": mod.U, "V": mod.V}
        if mod.bias is not None:
            t["bias"] = mod.bias
        n_rows, n_cols = int(rows.sum()), int(cols.sum())
        if int(nz.sum()) == 0:
            kind = "none"
        elif structured is not None and n_cols * S.shape[0] <= n_rows * S.shape[1]:
            kind = "cols"
            t["index"] = torch.nonzero(cols).flatten()
            t["values"] = S[:, t["index"]]
        elif structured is not None:
            kind = "rows"
            t["index"] = torch.nonzero(rows).flatten()
            t["values"] = S[t["index"]]
        else:
            kind = "csr"
            with warnings.catch_warnings():  # "CSR support is in beta": the format is only stored here
                warnings.simplefilter("ignore", UserWarning)
                csr = S.to_sparse_csr()
            t.update(crow=csr.crow_indices(), col=csr.col_indices(), values=csr.values())
        tensors[name] = t
        desc[name] = {"kind": kind, "rank": mod.rank, "shape": [mod.out_features, mod.in_features],
                      "bias": mod.bias is not None, "kept": int(nz.sum())}
    extra = {"task": task, "architectures": getattr(root.config, "architectures", None),
             "spec": spec.to_dict() if spec is not None else None, "parameters": parameter_counts(root)}
    return write_factorized(root, tokenizer, out, tensors, desc, extra, manifest)
