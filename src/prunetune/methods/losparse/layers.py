"""LoSparse's layers: the rank rule, `LowRankSparseLinear` (y = x·(U·V + S)ᵀ + b, from a Linear's truncated
SVD), swapping a model's linears for it and back (`factorize`, `materialize`), and the parameter counts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.models.arch import get_adapter, parameter_count, unwrap
from prunetune.models.factorized import FactorizedLinear, set_module as _set_module
from prunetune.pruning.masks import MaskSet

#: the projections factorised when a library caller names none (T5's cross-attention cq ck cv co included);
#: the recipe's default (`LosparseSpec.roles`) is the seven block projections
DEFAULT_ROLES = ("q", "k", "v", "o", "gate", "up", "down", "cq", "ck", "cv", "co")


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



# ------------------------------------------------------------------------------------------------ swapping
def targets(model: nn.Module, roles: tuple[str, ...] = DEFAULT_ROLES) -> dict[str, tuple[str, nn.Linear]]:
    """name -> (role, Linear) of the layers LoSparse replaces: attention and MLP projections only (the
    adapter never lists embeddings, norms, the pooler, the classifier or the LM head)."""

    return {n: (r, lin) for n, (r, lin) in get_adapter(model).linears().items()
            if r in roles and isinstance(lin, nn.Linear)}


def factorize(model: nn.Module, rank_ratio: float, roles: tuple[str, ...] = DEFAULT_ROLES,
              ranks: dict[str, int] | None = None) -> dict[str, dict]:
    """Swap every target Linear for an SVD-initialised LowRankSparseLinear, in place; returns layer facts."""

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

    return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, LowRankSparseLinear)}


@torch.no_grad()
def materialize(model: nn.Module, masks: MaskSet | None = None) -> nn.Module:
    """Replace every LowRankSparseLinear by a plain Linear W' = U·V + S⊙M, in place (any transformers loads it)."""

    root = unwrap(model)
    for name, mod in losparse_layers(root).items():
        if masks is not None and name in masks:
            mod.weight.mul_(masks[name].to(mod.weight.device, mod.weight.dtype))
        _set_module(root, name, mod.to_linear())
    return root


def parameter_counts(model: nn.Module) -> dict:
    """Parameters of the factorised model: targeted linears (U, V, kept S, bias) against the original dense
    linears they replace, and the whole model. Indices of the sparse part are bookkeeping, not counted."""

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
