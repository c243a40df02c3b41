"""Uniform widths: how many of each structure every layer keeps, and which ones.

One engine for VIB (`methods.vib`) and its baselines (L1, L2, Wanda-structured, FLAP), so that every row of
the benchmark shares the same width allocation, the same surgery and the same export. The three structures
of a Llama-family model:

* ``heads``: one KV group (a KV head, the query heads that read it, the o_proj columns they feed);
* ``neurons``: one MLP neuron (a gate/up row and a down column);
* ``hidden``: one channel of the residual stream (embedding column, every norm, the input of every
  projection, the output of o_proj and down_proj, the LM head's input).

transformers has no per-layer widths, so every layer keeps the same number of each structure (`Widths`),
chosen by score within the layer. Widths of neurons and hidden channels are multiples of `round_to`
(default 64: on CPU a width like 1,256 runs no faster than dense 1,536 while 1,280 does). The count that
a sparsity refers to is *block parameters*: the weights of the seven projections of every block (norms,
embeddings and the LM head excluded), as in the issue and the TVA-Prune paper.

`allocate_widths` turns a sparsity of block parameters into `Widths`; `select` keeps each layer's top-scored
structures at those widths (`Selection`), `keep_plan` turns a selection into the surgery's keep plan.
`keep_from_scores` builds a keep plan directly from per-structure scores with its own rounding (a fraction or
count per structure, moved to a multiple of `round_to`): the library path of the README's example.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.models.arch import AttentionGeometry, get_adapter
from prunetune.pruning.granularity import check_sparsity
from prunetune.pruning.shrink.couplings import STRUCTURES, check_structure, shrinkable_adapter, structure_units


@dataclass(frozen=True)
class Geometry:
    """The shape numbers of a Llama-family model that parameter and FLOP counts need: its attention geometry
    (`models.arch.AttentionGeometry`, the one type for heads, KV groups, head_dim and hidden size) plus the
    number of blocks, the MLP width and the vocabulary."""

    attention: AttentionGeometry
    layers: int
    inter: int
    vocab: int

    @property
    def hidden(self) -> int:
        return self.attention.hidden_size

    @property
    def heads(self) -> int:
        return self.attention.num_heads

    @property
    def kv_heads(self) -> int:
        return self.attention.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.attention.head_dim

    @property
    def groups(self) -> int:
        return self.attention.kv_groups

    def attn_params(self, kv: int | float, hidden: int | float) -> float:
        """q (G·kv·d rows), k and v (kv·d rows each), o (G·kv·d columns), all `hidden` wide."""
        return hidden * kv * self.head_dim * (2 * self.groups + 2)

    def mlp_params(self, neurons: int | float, hidden: int | float) -> float:
        return 3 * hidden * neurons

    def block_params(self, w: Widths) -> int:
        return int(self.layers * (self.attn_params(w.kv, w.hidden) + self.mlp_params(w.neurons, w.hidden)))

    def flops_per_token(self, w: Widths) -> int:
        """Multiply-adds x 2 of every weight a token meets: blocks plus the LM head (vocab x hidden).

        Attention's score/context products (which grow with the context) are left out: at the short contexts
        measured here they are a few percent, and they shrink with the kept heads like o_proj does.
        """
        return 2 * (self.block_params(w) + self.vocab * w.hidden)

    def dense(self) -> Widths:
        return Widths(self.kv_heads, self.inter, self.hidden)


@dataclass(frozen=True)
class Widths:
    """Kept structures per layer (uniform across layers): KV groups, MLP neurons, hidden channels."""

    kv: int
    neurons: int
    hidden: int

    def to_dict(self) -> dict:
        return asdict(self)


def geometry(model: nn.Module) -> Geometry:
    adapter = get_adapter(model)
    if adapter.family != "llama":
        raise PrunetuneError(f"structured shrinking supports the Llama family (heads, neurons, hidden); "
                             f"'{adapter.config.model_type}' is not one")
    return Geometry(adapter.attention(), adapter.num_blocks(), adapter.mlp_width(), int(adapter.config.vocab_size))


def parse_structures(structures: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    items = [s.strip() for s in structures.split(",")] if isinstance(structures, str) else list(structures)
    items = [s for s in items if s]
    bad = [s for s in items if s not in STRUCTURES]
    if bad or not items:
        raise PrunetuneError(f"unknown structure(s) {', '.join(bad) or '(none)'}; choose from {', '.join(STRUCTURES)}")
    return tuple(s for s in STRUCTURES if s in items)


def check_inputs(geom: Geometry, sparsity: float, structures: tuple[str, ...], round_to: int) -> None:
    """One-line errors for requests that cannot give a loadable model, before any work is done."""
    if not 0.0 <= sparsity < 1.0:
        raise PrunetuneError(f"sparsity must be in [0, 1), got {sparsity}")
    if round_to < 1:
        raise PrunetuneError(f"--round-to must be >= 1, got {round_to}")
    dims = {"neurons": geom.inter, "hidden": geom.hidden}
    for s in structures:
        if s in dims and round_to > dims[s]:
            raise PrunetuneError(f"--round-to {round_to} is larger than the {s} dimension ({dims[s]})")
    dense = geom.dense()
    # the most a request can remove: everything but one KV group / one rounding unit of each structure
    least = Widths(1 if "heads" in structures else dense.kv,
                   min(round_to, geom.inter) if "neurons" in structures else dense.neurons,
                   min(round_to, geom.hidden) if "hidden" in structures else dense.hidden)
    most = 1.0 - geom.block_params(least) / geom.block_params(dense)
    if sparsity > most + 1e-9:
        what = "every KV group of a layer" if structures == ("heads",) else "every structure of a layer"
        raise PrunetuneError(f"sparsity {sparsity} of block parameters with structures {','.join(structures)} would "
                             f"remove {what}: at most {most:.3f} is possible (add structures or lower the sparsity)")


def _round(x: float, multiple: int, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(x / multiple) * multiple)))


def fit_neurons(geom: Geometry, target_kept: float, kv: int, hidden: int, round_to: int) -> int:
    """Neurons per layer (a multiple of `round_to`) that bring block parameters closest to `target_kept`."""
    per_layer = target_kept / geom.layers - geom.attn_params(kv, hidden)
    return _round(per_layer / (3 * hidden), round_to, min(round_to, geom.inter), geom.inter)


def allocate_widths(geom: Geometry, sparsity: float, structures: tuple[str, ...], round_to: int = 64,
                    hint: Widths | None = None) -> Widths:
    """Uniform widths removing `sparsity` of block parameters.

    Without a `hint` (the baselines), every selected structure keeps the same fraction r; with a hint (VIB's
    learned kept counts) its KV groups and hidden width are used. KV groups are whole, hidden widths are
    rounded, and the neurons (finest step) absorb the rest so that all methods keep the same parameters.
    """
    check_inputs(geom, sparsity, structures, round_to)
    dense = geom.dense()
    target = (1.0 - sparsity) * geom.block_params(dense)
    if hint is None:
        def kept(r: float) -> float:
            w = Widths(geom.kv_heads * r if "heads" in structures else geom.kv_heads,
                       geom.inter * r if "neurons" in structures else geom.inter,
                       geom.hidden * r if "hidden" in structures else geom.hidden)
            return geom.layers * (geom.attn_params(w.kv, w.hidden) + geom.mlp_params(w.neurons, w.hidden))

        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if kept(mid) < target else (lo, mid)
        r = (lo + hi) / 2
        kv_f, hid_f = geom.kv_heads * r, geom.hidden * r
    else:
        kv_f, hid_f = hint.kv, hint.hidden
    kv, hidden = _heads_and_hidden(geom, kv_f, hid_f, structures, round_to)
    if "neurons" not in structures:
        return Widths(kv, geom.inter, hidden)
    return Widths(kv, fit_neurons(geom, target, kv, hidden, round_to), hidden)


def split_candidates(geom: Geometry, sparsity: float, structures: tuple[str, ...], round_to: int = 64
                     ) -> list[Widths]:
    """The splits between kinds that a measured choice tries: every whole KV-group count, from all kept (the
    whole budget from MLP neurons) down to one, the neurons absorbing the rest and the hidden width as the equal
    split has it. Only counts that reach the equal split's parameter count within one rounding unit of neurons
    in every layer are candidates (a count whose neurons would have to exceed the MLP width, or fall below one
    rounding unit, cannot). Without both heads and neurons there is no split to choose: the equal one."""
    equal = allocate_widths(geom, sparsity, structures, round_to)
    if not ("heads" in structures and "neurons" in structures):
        return [equal]
    tol = geom.layers * geom.mlp_params(round_to, equal.hidden)
    out = []
    for kv in range(geom.kv_heads, 0, -1):
        w = allocate_widths(geom, sparsity, structures, round_to, hint=Widths(kv, geom.inter, equal.hidden))
        if w.kv == kv and abs(geom.block_params(w) - geom.block_params(equal)) <= tol:
            out.append(w)
    return out or [equal]


def _heads_and_hidden(geom: Geometry, kv_f: float, hid_f: float, structures: tuple[str, ...],
                      round_to: int) -> tuple[int, int]:
    """Whole KV groups nearest `kv_f` and a hidden width nearest `hid_f` that stock transformers accepts.

    transformers' LlamaConfig refuses a hidden size that is not a multiple of the number of attention heads
    (even with an explicit head_dim), so a hidden width is a multiple of lcm(round_to, kept query heads):
    for SmolLM2 (9 heads, 3 KV groups) hidden 384 needs 6 or 3 heads, and 9 heads allow only 576.
    """
    kvs = (sorted(range(1, geom.kv_heads + 1), key=lambda k: (abs(k - kv_f), -k)) if "heads" in structures
           else [geom.kv_heads])
    for kv in kvs:
        heads = kv * geom.groups
        if "hidden" in structures:
            step = math.lcm(round_to, heads)
            top = geom.hidden // step * step
            if top < step:
                continue
            hidden = int(min(top, max(step, round(hid_f / step) * step)))
            if hidden == geom.hidden or hidden % heads == 0:
                return kv, hidden
        elif geom.hidden % heads == 0:
            return kv, geom.hidden
    raise PrunetuneError(f"no kept head count divides a hidden width that is a multiple of {round_to} "
                         f"(transformers needs hidden_size % num_attention_heads == 0); lower --round-to")


@dataclass
class Selection:
    """Kept indices, sorted: `kv` [layers, kv] KV groups, `neurons` [layers, n], `hidden` [h] channels."""

    kv: torch.Tensor
    neurons: torch.Tensor
    hidden: torch.Tensor

    def widths(self) -> Widths:
        return Widths(self.kv.shape[1], self.neurons.shape[1], self.hidden.numel())


def select(scores: dict[str, torch.Tensor], widths: Widths, geom: Geometry) -> Selection:
    """Top-`width` structures by score in every layer (higher score = more important); sorted indices."""
    def top(s: torch.Tensor | None, k: int, n: int, shape: tuple[int, ...]) -> torch.Tensor:
        if s is None or k >= n:
            return torch.arange(n).expand(*shape, n).clone() if shape else torch.arange(n)
        idx = torch.topk(s.double(), k, dim=-1, sorted=False).indices  # ties: any, scores are continuous
        return torch.sort(idx, dim=-1).values

    return Selection(top(scores.get("heads"), widths.kv, geom.kv_heads, (geom.layers,)),
                     top(scores.get("neurons"), widths.neurons, geom.inter, (geom.layers,)),
                     top(scores.get("hidden"), widths.hidden, geom.hidden, ()))


def keep_plan(model: nn.Module, sel: Selection) -> dict[str, torch.Tensor]:
    """The selection as the surgery's plan {kind: bool keep-tensor} (`pruning.shrink.surgery.shrink`)."""
    geom = geometry(model)

    def keep(idx: torch.Tensor, n: int) -> torch.Tensor:
        out = torch.zeros(*idx.shape[:-1], n, dtype=torch.bool)
        return out.scatter_(-1, idx, True)

    return {"heads": keep(sel.kv, geom.kv_heads), "neurons": keep(sel.neurons, geom.inter),
            "hidden": keep(sel.hidden, geom.hidden)}

DEFAULT_ROUND_TO = {"heads": 1, "neurons": 64, "hidden": 64}  # heads: in KV groups; others: channels


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
    adapter = shrinkable_adapter(model)
    plan: dict[str, torch.Tensor] = {}
    for kind, sc in scores.items():
        check_structure(adapter, kind)
        layers, n = structure_units(adapter, kind)
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
