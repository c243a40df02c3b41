"""Structured pruning that shrinks the model: scores -> uniform widths -> selection -> fold/compensate -> shrink.

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

The math of the baselines' scores is in pure functions (`group_*`); `methods.structured.prune_structured` is the lifecycle.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.models.arch import ArchAdapter, base_linear, get_adapter, unwrap
from prunetune.pruning.criteria import get_criterion
from prunetune.pruning.criteria.flap import MomentStats

STRUCTURES = ("heads", "neurons", "hidden")
BASELINES = ("l1", "l2", "wanda", "flap")  # registry criteria (`pruning.criteria`) that score structures


# ----------------------------------------------------------------------------------------- geometry, widths
@dataclass(frozen=True)
class Geometry:
    """The shape numbers of a Llama-family model that parameter and FLOP counts need."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

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
    g = adapter.attention()
    return Geometry(adapter.num_blocks(), g.hidden_size, g.num_heads, g.num_kv_heads, g.head_dim,
                    adapter.mlp_width(), int(adapter.config.vocab_size))


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


# --------------------------------------------------------------------------------------------- selection
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


def _removed(kept: torch.Tensor, n: int) -> torch.Tensor:
    keep = torch.zeros(n, dtype=torch.bool)
    keep[kept] = True
    return ~keep


def _layers(adapter: ArchAdapter) -> list[dict[str, nn.Linear]]:
    return [b.linears for b in adapter.blocks()]


def keep_plan(model: nn.Module, sel: Selection) -> dict[str, torch.Tensor]:
    """The selection as the surgery's plan {kind: bool keep-tensor} (`pruning.structured.shrink`)."""
    geom = geometry(model)

    def keep(idx: torch.Tensor, n: int) -> torch.Tensor:
        out = torch.zeros(*idx.shape[:-1], n, dtype=torch.bool)
        return out.scatter_(-1, idx, True)

    return {"heads": keep(sel.kv, geom.kv_heads), "neurons": keep(sel.neurons, geom.inter),
            "hidden": keep(sel.hidden, geom.hidden)}


@torch.no_grad()
def apply_masks(model: nn.Module, sel: Selection) -> None:
    """Zero every removed structure in place: the masked model whose logits `shrink` reproduces."""
    from prunetune.pruning.structured import mask_structures

    plan = keep_plan(model, sel)
    mask_structures(model, {k: v for k, v in plan.items() if not bool(v.all())})


def shrink_selection(model: nn.Module, sel: Selection, structures: tuple[str, ...] = STRUCTURES) -> nn.Module:
    """Physically remove what `sel` drops with the adapter's surgery; the config is rewritten for stock
    `from_pretrained` (RMSNorm gains and eps corrected for hidden channels)."""
    from prunetune.pruning.structured import shrink

    plan = keep_plan(model, sel)
    shrink(model, {k: v for k, v in plan.items() if not bool(v.all())})
    return model


# -------------------------------------------------------------------------------------- baseline scores
def column_scores(method: str, weight: torch.Tensor, stats: MomentStats | None) -> torch.Tensor:
    """Importance of each input column of a linear, in float64, by the registry's criterion: L1/L2 of the
    column, Wanda Σ|W|·||X||, FLAP var(X)·||W||²."""
    if method not in BASELINES:
        raise PrunetuneError(f"unknown structured criterion '{method}'; choose from {', '.join(BASELINES)}")
    return get_criterion(method, structures=True).column_scores(weight.detach().double(), stats)


def row_scores(method: str, weight: torch.Tensor) -> torch.Tensor:
    return get_criterion(method, structures=True).row_scores(weight.detach().double())


def _norm(x: torch.Tensor) -> torch.Tensor:
    return x / x.mean().clamp_min(1e-30)


def baseline_scores(model: nn.Module, method: str, stats: dict[str, MomentStats] | None) -> dict[str, torch.Tensor]:
    """Scores of every structure. L1/L2 sum every coupled weight (each member normalised by its mean, as in
    `pruning.structured.group_scores`); Wanda and FLAP score what a structure *feeds* (the o_proj / down_proj
    input columns, FLAP's choice) and, for hidden channels, the input columns of every projection."""
    adapter = get_adapter(model)
    geom = geometry(model)
    qchunk = geom.groups * geom.head_dim
    names = [{r: adapter.name_of(m) for r, m in lin.items()} for lin in _layers(adapter)]
    heads, neurons = [], []
    hidden = torch.zeros(geom.hidden, dtype=torch.float64)
    for l, lin in enumerate(_layers(adapter)):
        st = (lambda r: stats[names[l][r]]) if stats is not None else (lambda r: None)
        o_cols = column_scores(method, lin["o"].weight, st("o")).cpu()
        d_cols = column_scores(method, lin["down"].weight, st("down")).cpu()
        h = _norm(o_cols.view(geom.kv_heads, qchunk).sum(1))
        n = _norm(d_cols)
        if method in ("l1", "l2"):
            for r, chunk in (("q", qchunk), ("k", geom.head_dim), ("v", geom.head_dim)):
                h += _norm(row_scores(method, lin[r].weight).cpu().view(geom.kv_heads, chunk).sum(1))
            for r in ("gate", "up"):
                n += _norm(row_scores(method, lin[r].weight).cpu())
            for r in ("o", "down"):
                hidden += _norm(row_scores(method, lin[r].weight).cpu())
        for r in ("q", "k", "v", "gate", "up"):
            hidden += _norm(column_scores(method, lin[r].weight, st(r)).cpu())
        heads.append(h)
        neurons.append(n)
    if method in ("l1", "l2"):
        hidden += _norm(column_scores(method, unwrap(model).get_input_embeddings().weight, None).cpu())
    return {"heads": torch.stack(heads), "neurons": torch.stack(neurons), "hidden": hidden}


def collect_moments(model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> dict[str, MomentStats]:
    """Input moments of every projection from one pass of the dense model over the calibration windows."""
    from prunetune.pruning.calibrate import collect_all, layer_key

    adapter = get_adapter(model)
    targets = {layer_key(adapter, lin) for _, lin in adapter.linears().values()}
    return collect_all(model, ids, lambda _n, lin, dev: MomentStats(lin.in_features, dev), targets,
                       batch_size=batch_size, progress=False)


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
    for l, lin in enumerate(_layers(adapter)):
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
    for lin in _layers(adapter):
        for m in lin.values():
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device),
                                      requires_grad=False)
    cfg = unwrap(model).config
    cfg.attention_bias = True
    cfg.mlp_bias = True


# ---------------------------------------------------------------------------------------------- lifecycle
def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    from prunetune.pruning.api import calibration_ids

    return calibration_ids(source, tokenizer, nsamples, seqlen, seed)
