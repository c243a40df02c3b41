"""VIB's gates: one `GateBank` per kind of structure (KV groups, MLP neurons, hidden channels), z = μ + σ·ε in
training, thresholded at log α = log σ² − log μ² < 0 in eval; `VibGates` holds a model's banks."""

from __future__ import annotations

import torch
from torch import nn

from prunetune.pruning.shrink.widths import Geometry

EPS = 1e-8


class GateBank(nn.Module):
    """Gates of one kind, any shape: posterior mean μ and log-variance log σ² per structure."""

    def __init__(self, shape: tuple[int, ...], init_log_sigma2: float, gen: torch.Generator) -> None:
        super().__init__()
        self.mu = nn.Parameter(1.0 + 0.01 * torch.randn(shape, generator=gen))
        self.log_sigma2 = nn.Parameter(init_log_sigma2 + 0.01 * torch.randn(shape, generator=gen))
        self.keep_override: torch.Tensor | None = None  # eval-mode keep set (after uniform selection)
        self.antithetic = False  # training noise of example i + B/2 is minus that of example i

    def log_alpha(self) -> torch.Tensor:
        """log σ² − log μ²: the structure is kept where it is < 0 (signal above noise)."""
        return self.log_sigma2 - torch.log(self.mu.pow(2) + EPS)

    def keep(self) -> torch.Tensor:
        return self.keep_override if self.keep_override is not None else (self.log_alpha() < 0)

    def keep_prob(self, beta: float) -> torch.Tensor:
        return torch.sigmoid(-beta * self.log_alpha())

    def kl(self) -> torch.Tensor:
        """VIBNet's closed form: ½ Σ log(1 + μ²/σ²)."""
        return 0.5 * torch.log1p(self.mu.pow(2) / (self.log_sigma2.exp() + EPS)).sum()

    def z(self, batch: int, index: int | None = None) -> torch.Tensor:
        """[batch, *shape[1:] or shape] gate values: sampled while training, μ ⊙ keep in eval."""
        mu, ls = (self.mu, self.log_sigma2) if index is None else (self.mu[index], self.log_sigma2[index])
        if self.training:
            if self.antithetic and batch % 2 == 0:
                half = torch.randn((batch // 2, *mu.shape), device=mu.device, dtype=mu.dtype)
                eps = torch.cat([half, -half])
            else:
                eps = torch.randn((batch, *mu.shape), device=mu.device, dtype=mu.dtype)
            return mu + eps * (0.5 * ls).exp()
        keep = self.keep() if index is None else self.keep()[index]
        return (mu * keep.to(mu.dtype)).unsqueeze(0)


class VibGates(nn.Module):
    """All gates of a model: heads [layers, kv_heads], neurons [layers, inter], hidden [hidden]."""

    def __init__(self, geom: Geometry, structures: tuple[str, ...], init_log_sigma2: float, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.geom = geom
        self.banks = nn.ModuleDict()
        shapes = {"heads": (geom.layers, geom.kv_heads), "neurons": (geom.layers, geom.inter), "hidden": (geom.hidden,)}
        for s in structures:
            self.banks[s] = GateBank(shapes[s], init_log_sigma2, gen)

    def kl(self) -> torch.Tensor:
        return sum(b.kl() for b in self.banks.values())

    def kept_fraction(self, probs: dict[str, torch.Tensor], att_mul: float) -> torch.Tensor:
        """Kept fraction of block parameters (attention weighted by `att_mul`) for per-structure keep values."""
        g = self.geom
        ref = next(iter(probs.values()))
        hid = probs["hidden"].sum() if "hidden" in probs else torch.tensor(float(g.hidden), device=ref.device)
        kv = probs["heads"].sum(-1) if "heads" in probs else torch.full((g.layers,), float(g.kv_heads), device=ref.device)
        nn_ = probs["neurons"].sum(-1) if "neurons" in probs else torch.full((g.layers,), float(g.inter), device=ref.device)
        att = att_mul * g.attn_params(kv, hid).sum()
        mlp = g.mlp_params(nn_, hid).sum()
        dense = g.layers * (att_mul * g.attn_params(g.kv_heads, g.hidden) + g.mlp_params(g.inter, g.hidden))
        return (att + mlp) / dense

    def soft(self, beta: float) -> dict[str, torch.Tensor]:
        return {k: b.keep_prob(beta) for k, b in self.banks.items()}

    def hard(self) -> dict[str, torch.Tensor]:
        return {k: b.keep().float() for k, b in self.banks.items()}
