"""`prune(model, ...)`: one call from any script or the CLI, pruning an in-memory model in place.

It validates everything before touching the model (a bad option never leaves a half-pruned model), turns
the calibration argument into token ids, and composes the parts: a criterion from the registry
(`pruning/criteria`: magnitude, Wanda, SparseGPT, PAYT's l1-global and l2-cols) gives scores or updated
weights per layer, a granularity turns scores into a keep-mask of exactly the asked
sparsity, the calibration engine decides when statistics are collected. The returned `MaskSet` is keyed by
module name and holds its masks bit-packed (read back as the same bool tensors); the zeros are already in the
weights. Memory: the model, one block's calibration activations, one layer's statistics and scores, and
1/8 byte per pruned weight for its mask.

Which granularity does what:

* `row` / `layer`: unstructured, pruning floor(s × in_features) per output row (Wanda's comparison group,
  the default for magnitude and Wanda) or floor(s × numel) per layer. SparseGPT selects adaptively inside
  each 128-column block with the same exact counts: `layer` (its default, the paper's selection over the
  whole block) or `row` (the same count in every row of the block; on SmolLM2 at 70% it is 2.8% worse in
  perplexity, BENCHMARKS.md).
* `global`: one threshold over all pruned layers (magnitude, Wanda); Wanda statistics then come from one
  pass over the dense model, since every layer's scores are needed before any layer is pruned.
* `rows` / `cols`: whole output rows / input columns of each layer.
* `heads` / `neurons`: coupled structures (GQA KV groups with their query heads and o columns; MLP channels
  across gate/up/down), see `pruning/shrink/couplings.py`.
* `pattern="2:4"` (N:M) keeps N of every M consecutive inputs in each row; sparsity is then 1 − N/M.

Beyond one criterion: `layer_sparsity="owl"` gives each block its own sparsity from its share of activation
outliers, the mean kept at `sparsity` (`allocation.py`, one extra dense pass over the blocks; any criterion);
`refine="dsnot"` swaps pruned and kept weights of each layer after its criterion to shrink the expected output
shift (`refine.py`, any calibrated criterion, from moments collected in the same passes); `method="admm"` is a
weight-updating criterion like SparseGPT (`criteria/admm.py`), with `options` (iters, gradual, damp, rho, refit).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.models.arch import get_adapter, unwrap
from prunetune.pruning import calibrate
from prunetune.pruning.allocation import LAYER_SPARSITY, OWL_LAMBDA, OWL_M, check_owl, owl_block_ratios, owl_sparsities
from prunetune.pruning.calibrate import calibration_ids
from prunetune.pruning.criteria import ALL_GRANULARITIES, Criterion, criterion_names, get_criterion
from prunetune.pruning.granularity import check_sparsity, global_masks, mask_from_scores, parse_nm
from prunetune.pruning.masks import MaskSet
from prunetune.pruning.refine import WithMoments, check_refine, dsnot
from prunetune.pruning.shrink.couplings import MASK_STRUCTURES, couplings, structured_masks


def resolve_granularity(method: str, granularity: str | None, pattern: str | None = None) -> str:
    """`granularity`, or the criterion's own default when it is None (SparseGPT: `layer`, the paper's
    adaptive selection over each 128-column block; Wanda and magnitude: `row`; an N:M pattern is per row)."""
    if granularity is not None:
        return granularity
    default = get_criterion(method).default_granularity
    return "row" if parse_nm(pattern) is not None and default not in ("row", "layer") else default


def resolve_extras(method: str, layer_sparsity: str | None, refine: str | None) -> tuple[str, str | None]:
    """(layer sparsity, refinement) with None = the method's own (a preset such as `owl-admm` names both)."""
    preset = getattr(get_criterion(method), "preset", {})
    ls = layer_sparsity if layer_sparsity is not None else preset.get("layer_sparsity", "uniform")
    rf = refine if refine is not None else preset.get("refine")
    return str(ls).strip().lower(), (None if rf in (None, "", "none") else str(rf).strip().lower())


def validate(method: str, sparsity: float, pattern: str | None, granularity: str | None, *,
             layer_sparsity: str | None = None, refine: str | None = None, owl_lambda: float | None = None,
             owl_m: float | None = None, options: dict | None = None) -> tuple[int, int] | None:
    """Check options without a model (the CLI calls this before loading anything); returns the N:M pair."""
    crit = get_criterion(method)
    layer_sparsity, refine = resolve_extras(method, layer_sparsity, refine)
    check_sparsity(sparsity)
    nm = parse_nm(pattern)
    granularity = resolve_granularity(method, granularity, pattern)
    if granularity not in ALL_GRANULARITIES:
        raise PrunetuneError(f"unknown granularity '{granularity}'; choose one of: {', '.join(ALL_GRANULARITIES)}")
    if nm is not None and granularity not in ("row", "layer"):
        raise PrunetuneError(f"an N:M pattern is per row; it cannot be combined with granularity '{granularity}'")
    if granularity not in crit.granularities:
        raise PrunetuneError(f"{crit.name} prunes with granularity {' | '.join(crit.granularities)}, "
                             f"not '{granularity}'")
    if crit.statistics == "gradients":
        raise PrunetuneError(f"{crit.name} scores from gradients during training; one-shot pruning cannot use it")
    if layer_sparsity not in LAYER_SPARSITY:
        raise PrunetuneError(f"unknown layer sparsity '{layer_sparsity}'; choose one of: {', '.join(LAYER_SPARSITY)}")
    if layer_sparsity == "owl":
        check_owl(OWL_LAMBDA if owl_lambda is None else owl_lambda, OWL_M if owl_m is None else owl_m)
        if nm is not None:
            raise PrunetuneError("OWL allocates a sparsity per block; an N:M pattern fixes it in every layer")
        if granularity == "global":
            raise PrunetuneError("OWL allocates a sparsity per block; a global threshold chooses its own")
    if refine is not None:
        check_refine(refine, crit.statistics, crit.name)
        if granularity not in ("row", "layer"):
            raise PrunetuneError(f"--refine {refine} swaps weights inside each row; granularity '{granularity}' "
                                 "prunes whole structures")
    if options:
        if not hasattr(crit, "check"):
            raise PrunetuneError(f"{crit.name} takes no options, got {sorted(options)}")
        crit.check(**options)
    return nm


def select_targets(model: nn.Module, skip: list[str] | None) -> dict[str, nn.Linear]:
    """Prunable linears minus those whose name matches a skip regex; a regex matching nothing is an error."""
    adapter = get_adapter(model)
    linears = {calibrate.layer_key(adapter, lin): lin for _, lin in adapter.linears().values()}
    out = dict(linears)
    for pat in skip or []:
        try:
            rx = re.compile(pat)
        except re.error as exc:
            raise PrunetuneError(f"skip pattern '{pat}' is not a valid regular expression: {exc}") from None
        hits = [n for n in linears if rx.search(n)]
        if not hits:
            raise PrunetuneError(f"skip pattern '{pat}' matches no prunable layer (e.g. '{next(iter(linears))}')")
        for n in hits:
            out.pop(n, None)
    if not out:
        raise PrunetuneError("the skip patterns exclude every prunable layer: nothing to prune")
    return out


def masked_layers(model: nn.Module, targets: dict[str, nn.Linear], granularity: str) -> list[str]:
    """The layers `prune` gives a mask, known before pruning: every target, except that heads / neurons
    pruning masks only the targets inside a coupling of that kind (the MLP has no heads)."""
    if granularity not in MASK_STRUCTURES:
        return list(targets)

    adapter = get_adapter(model)
    inside = {m.name for b in adapter.blocks() for c in couplings(adapter, b, granularity) for m in c.members}
    return [n for n in targets if n in inside]


def _masks_from_scores(adapter, blocks, scores: dict[str, torch.Tensor], sparsity: float, granularity: str,
                       nm: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    """Scores of some layers -> their keep-masks at the asked granularity (global handled by the caller)."""
    if granularity in MASK_STRUCTURES:
        out: dict[str, torch.Tensor] = {}
        for b in blocks:
            out.update(structured_masks(adapter, b, scores, granularity, sparsity))
        return out
    return {n: mask_from_scores(s, sparsity, granularity, nm) for n, s in scores.items()}


@torch.no_grad()
def prune(model: nn.Module, method: str = "wanda", sparsity: float = 0.5, *, pattern: str | None = None,
          granularity: str | None = None, calib=None, tokenizer=None, nsamples: int = 32, seqlen: int = 512,
          skip: list[str] | None = None, device: str | torch.device | None = None, seed: int = 0,
          progress: bool | None = None, batch_size: int = 1,
          stats_hook: Callable[[str, object], None] | None = None,
          previous: MaskSet | dict[str, torch.Tensor] | None = None, io: calibrate.BlockIO | None = None,
          masks: MaskSet | None = None, layer_sparsity: str | None = None, owl_lambda: float | None = None,
          owl_m: float | None = None, refine: str | None = None, options: dict | None = None) -> MaskSet:
    """Prune `model` in place and return its MaskSet (keyed by module name of the unwrapped model).

    `calib`: LongTensor [n, seqlen] of token ids, a `TextSource`, or a source name (`wikitext2`, `bbc-news`,
    a file) tokenised with `tokenizer` into `nsamples` × `seqlen` windows chosen with `seed`. Needed by
    wanda and sparsegpt; magnitude ignores it. `skip`: regexes of module names to leave dense.
    `method`: any registered criterion (`prunetune.pruning.criteria.CRITERIA`) or alias.
    `granularity`: None = the criterion's default (SparseGPT `layer`, Wanda and magnitude `row`, l1-global
    `global`, l2-cols `cols`).
    `device`: where calibration runs (one block at a time); the model stays where it is.
    Process state is left alone: calibration windows are drawn with a local generator seeded by `seed` (the
    global RNG is neither read nor reseeded, so dropout in a training loop around it keeps its stream), and
    glibc's allocator settings are unchanged (a process that only prunes may call
    `calibrate.bound_heap_growth()` itself, as the `prune` command and the benchmark do).
    `batch_size`: calibration windows per block forward. 1 by default: one window's block intermediates at a
    time (at 4 they added ~40 MiB to the peak on SmolLM2 at 512 tokens) for the same CPU time; the statistics
    are sums over tokens, so only summation order changes (Wanda's masks are identical, SparseGPT's OBS
    updates can turn last-bit differences into a few different choices).
    `stats_hook(name, stats)` sees each layer's calibration statistics (for tests and diagnostics).
    `previous`: keep-masks of an earlier pruning. Pruning only ever adds zeros: weights outside `previous`,
    and weights that are already exactly zero, stay pruned and count towards `sparsity` (SparseGPT treats
    them as pruned in its OBS updates, so its compensation accounts for them).
    `io`: where blocks live between their turns (`calibrate.BlockIO`; default in the model). A streaming io
    (`stream.StreamIO`) reads each block from disk before its turn and writes it, with its masks taken out
    of `masks` (the MaskSet to fill; a new one by default), after it; `stream.prune_checkpoint` sets this up.
    `layer_sparsity`: "uniform" or "owl" (each block its own sparsity, `owl_lambda` / `owl_m`, mean = `sparsity`);
    None = the method's own (uniform unless a preset says otherwise). `refine`: None / "dsnot" (after the
    criterion, per layer). `options`: the criterion's own settings (ADMM: iters, gradual, damp, rho, refit).
    """
    nm = validate(method, sparsity, pattern, granularity, layer_sparsity=layer_sparsity, refine=refine,
                  owl_lambda=owl_lambda, owl_m=owl_m, options=options)
    crit = get_criterion(method)
    layer_sparsity, refine = resolve_extras(method, layer_sparsity, refine)
    owl = layer_sparsity == "owl"
    opts = crit.check(**(options or {})) if hasattr(crit, "check") else {}
    granularity = resolve_granularity(method, granularity, pattern)
    if nm is not None:
        sparsity = 1.0 - nm[0] / nm[1]
    root = unwrap(model)
    adapter = get_adapter(root)
    targets = select_targets(root, skip)
    if nm is not None:
        for name, lin in targets.items():
            if lin.in_features % nm[1]:
                raise PrunetuneError(f"N:M {pattern} needs in_features divisible by {nm[1]}; {name} has "
                                     f"{lin.in_features} (skip it with --skip)")
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise PrunetuneError("--device cuda asked but no CUDA device is available")
    ids = None
    if crit.needs_calibration or owl:
        if calib is None:
            who = crit.name if crit.needs_calibration else "OWL (layer sparsity from activation outliers)"
            raise PrunetuneError(f"{who} needs calibration data: pass calib (token ids, a TextSource or a "
                                 "source name)")
        ids = calibration_ids(calib, tokenizer, nsamples, seqlen, seed)
        vocab = root.get_input_embeddings().num_embeddings
        if int(ids.max()) >= vocab or int(ids.min()) < 0:
            raise PrunetuneError(f"calibration token ids fall outside the model's vocabulary of {vocab}")

    if io is not None and (granularity == "global" or getattr(root.config, "is_encoder_decoder", False)):
        raise PrunetuneError("granularity 'global' ranks every layer's scores at once and encoder-decoder models "
                             "calibrate both stacks together: neither can stream; prune them in memory (--no-stream)")
    prior = _prior(targets, previous)
    masks = masks if masks is not None else MaskSet()
    blocks = adapter.blocks()
    io = io if io is not None else calibrate.InMemory(None, None)  # weight-only criteria: blocks stay put
    encdec = bool(getattr(root.config, "is_encoder_decoder", False))
    layer_sp: dict[str, float] = {}  # layer -> its block's sparsity (OWL); absent = `sparsity`
    if owl:
        lam, m = OWL_LAMBDA if owl_lambda is None else owl_lambda, OWL_M if owl_m is None else owl_m
        ratios, sizes = owl_block_ratios(model, ids, targets, m, device=device, batch_size=batch_size,
                                         progress=progress, encoder_decoder=encdec,
                                         io=None if isinstance(io, calibrate.InMemory) else io)
        with_targets = [b for b in blocks if any(calibrate.layer_key(adapter, x) in targets
                                                 for x in b.linears.values())]
        for b, s in zip(with_targets, owl_sparsities(ratios, sizes, sparsity, lam)):
            for x in b.linears.values():
                layer_sp[calibrate.layer_key(adapter, x)] = s

    def prune_layers(names_stats: dict[str, object], blocks_of: list) -> None:
        """Prune these layers from their statistics (None for weight-only criteria)."""
        if stats_hook:
            for n, st in names_stats.items():
                if st is not None:
                    stats_hook(n, st.inner if isinstance(st, WithMoments) else st)
        if crit.updates_weights or granularity in ("row", "layer"):
            # one layer at a time, its statistics released as soon as it is pruned: at most one layer's
            # scores / updated weights exist besides the model
            for n in list(names_stats):
                st = names_stats.pop(n)
                moments = None
                if isinstance(st, WithMoments):
                    st, moments = st.inner, st.moments
                s_n = layer_sp.get(n, sparsity)
                dense = targets[n].weight.detach().clone() if moments is not None else None
                if crit.updates_weights:
                    _update_layer(crit, n, targets[n], st, s_n, nm, granularity, masks, prior, opts)
                else:
                    score = _floor(crit.score(targets[n].weight, st), targets[n].weight, prior, n, granularity)
                    _apply(targets, {n: mask_from_scores(score, s_n, granularity, nm)}, masks, prior)
                if moments is not None:
                    _refine_layer(n, targets[n], dense, moments, nm, masks, prior)
                del st, dense
            return
        scores = {n: _floor(crit.score(targets[n].weight, st), targets[n].weight, prior, n, granularity)
                  for n, st in names_stats.items()}
        sp = layer_sp.get(next(iter(scores)), sparsity) if len(blocks_of) == 1 and scores else sparsity
        new = global_masks(scores, sparsity) if granularity == "global" else \
            _masks_from_scores(adapter, blocks_of, scores, sp, granularity, nm)
        _apply(targets, new, masks, prior)

    if not crit.needs_calibration:
        if granularity == "global":
            prune_layers(dict.fromkeys(targets), blocks)
        else:  # block by block, so only one block's scores exist at a time
            for b in blocks:
                names = [k for k in (calibrate.layer_key(adapter, x) for x in b.linears.values()) if k in targets]
                io.load(b.module)
                prune_layers(dict.fromkeys(names), [b])
                io.release(b.module)
        return masks

    def factory(_name: str, lin: nn.Linear, dev: torch.device):
        st = crit.make_stats(lin.in_features, dev)
        return WithMoments(st, lin.in_features, dev) if refine else st

    if granularity == "global" or encdec:
        # every layer's statistics before any pruning: one pass over the dense model
        stats = calibrate.collect_all(model, ids, factory, set(targets), batch_size=batch_size, progress=progress)
        prune_layers(stats, blocks)
    else:
        calibrate.sequential(model, ids, factory, lambda block, stats: prune_layers(stats, [block]),
                             targets=set(targets), device=device, batch_size=batch_size, progress=progress,
                             io=None if isinstance(io, calibrate.InMemory) else io)
    return masks


def _prior(targets: dict[str, nn.Linear], previous) -> dict[str, torch.Tensor]:
    """The previous keep-masks of the targets, shapes checked before anything is pruned."""
    prior = {}
    for name, prev in (previous or {}).items():
        if name not in targets:
            continue
        shape = tuple(targets[name].weight.shape)
        if tuple(prev.shape) != shape:
            raise PrunetuneError(f"previous mask for '{name}' has shape {tuple(prev.shape)}, weight {shape}")
        prior[name] = prev.to(torch.bool)
    return prior


def _alive(name: str, weight: torch.Tensor, prior: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Keep-mask of what is still alive: not already zero and inside the previous mask; None when all is.

    Built per layer on demand, so a dense model costs no extra memory."""
    alive = weight.detach() != 0
    if name in prior:
        alive &= prior[name].to(alive.device)
    return None if bool(alive.all()) else alive


def _floor(scores: torch.Tensor, weight: torch.Tensor, prior: dict[str, torch.Tensor], name: str,
           granularity: str) -> torch.Tensor:
    """Already-pruned weights score lowest, so an unstructured selection takes them first and counts them.

    Structured granularities sum scores over a group, where one -inf would condemn the whole group; there the
    prior is only intersected afterwards (`_apply`)."""
    if granularity in MASK_STRUCTURES or granularity in ("rows", "cols"):
        return scores
    alive = _alive(name, weight, prior)
    return scores if alive is None else scores.masked_fill(~alive.to(scores.device), float("-inf"))


def _apply(targets: dict[str, nn.Linear], new: dict[str, torch.Tensor], masks: MaskSet,
           prior: dict[str, torch.Tensor]) -> None:
    for name, mask in new.items():
        w = targets[name].weight
        alive = _alive(name, w, prior)
        if alive is not None:
            mask = mask & alive.to(mask.device)
        w.mul_(mask.to(device=w.device, dtype=w.dtype))
        masks.set_packed(name, mask.cpu())


def _update_layer(crit: Criterion, name: str, lin: nn.Linear, stats, sparsity: float, nm, granularity: str,
                  masks: MaskSet, prior: dict[str, torch.Tensor], opts: dict | None = None) -> None:
    """A weight-updating criterion (SparseGPT) rewrites the layer; zeros already in it are forced by it."""
    w = lin.weight
    new_w, keep = crit.update(w, stats, sparsity, pattern=nm, granularity=granularity, keep=prior.get(name),
                              **(opts or {}))
    w.copy_(new_w.to(device=w.device, dtype=w.dtype))
    del new_w
    masks.set_packed(name, keep.cpu())


def _refine_layer(name: str, lin: nn.Linear, dense: torch.Tensor, moments, nm, masks: MaskSet,
                  prior: dict[str, torch.Tensor]) -> None:
    """DSnoT after the criterion: swap weights of the just-pruned layer against its dense copy (same counts)."""
    w = lin.weight
    keep = masks[name].to(w.device)
    allowed = None if name not in prior else prior[name].to(w.device)
    new_w, keep = dsnot(dense, w.detach(), keep, moments, pattern=nm, allowed=allowed)
    w.copy_(new_w.to(device=w.device, dtype=w.dtype))
    masks.set_packed(name, keep.cpu())


def registered_name(name: str, context: str | None = None) -> str:
    """A criterion name or alias -> its registered name, for a recipe schema's validator: a ValueError listing
    the registry's names (pydantic reports it as one line naming the key)."""
    try:
        return get_criterion(name, context).name
    except PrunetuneError:
        choices = ", ".join(repr(n) for n in criterion_names())
        raise ValueError(f"{name!r} is not allowed; choose one of: {choices}") from None
