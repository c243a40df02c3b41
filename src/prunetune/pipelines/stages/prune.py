"""The `prune` stage: one-shot pruning through the engine (in memory or streamed), with histograms."""

from __future__ import annotations

from collections.abc import Callable
import time
from pathlib import Path

import torch

from prunetune.data.calibration import calibration_samples
from prunetune.data.sources import load_text
from prunetune.errors import PrunetuneError
from prunetune.manifest import build_manifest
from prunetune.models.arch import get_adapter
from prunetune.models.card import write_model_card
from prunetune.models.loading import local_hf_dir, resolve_dtype
from prunetune.pipelines.stages.common import card_info, dump, save_model, sparsity_metric, zeros_metric
from prunetune.pruning.api import prune, resolve_granularity
from prunetune.pruning.criteria import get_criterion
from prunetune.pruning.masks import _module
from prunetune.pruning.stream import (
    check_disk,
    decide,
    open_checkpoint,
    output_bytes,
    parse_bytes,
    plan_memory,
    prune_checkpoint,
    read_tensor,
    skeleton,
)
from prunetune.registry import StageKind, register_stage
from prunetune.rundir import atomic_dir

PACKAGE = "prunetune.pipelines.stages"  # stages are looked up on the package (tests patch them there)


HIST_BINS = 60


def chosen_layers(model) -> list[str]:
    """Three layers shown in weight histograms: first block's q, a middle block's up, last block's down."""
    blocks = get_adapter(model).blocks()
    picks = [(blocks[0], ("q",)), (blocks[len(blocks) // 2], ("up", "gate", "o")), (blocks[-1], ("down", "o"))]
    out = []
    for b, roles in picks:
        for role in roles:
            if role in b.linears:
                out.append(f"{b.name}.{_attr_path(b, role)}")
                break
    return list(dict.fromkeys(out))


def _attr_path(block, role: str) -> str:
    target = block.linears[role]
    for name, mod in block.module.named_modules():
        if mod is target:
            return name
    raise PrunetuneError(f"layer of role {role} not found in block {block.name}")


@torch.no_grad()
def weight_histograms(model, names: list[str], edges: dict[str, list[float]] | None = None,
                      read: Callable[[str], torch.Tensor] | None = None) -> dict:
    """|w| histograms (exact zeros counted apart) of the named linears; `edges` reuses the dense bins.
    `read(name)` gives a layer's weight when the model is not in memory (streaming reads it from disk)."""
    out = {}
    for n in names:
        w = (read(n) if read is not None else _module(model, n).weight).detach().abs().flatten().float()
        e = torch.tensor(edges[n]) if edges else torch.linspace(0, float(torch.quantile(w[:1_000_000], 0.999)) * 1.05,
                                                                 HIST_BINS + 1)
        nz = w[w != 0]
        counts = torch.histogram(nz.clamp(max=float(e[-1])), bins=e).hist
        out[n] = {"edges": e.tolist(), "counts": counts.tolist(), "zeros": int((w == 0).sum()), "numel": w.numel()}
    return out


def prune_model(loaded, recipe, spec, seed: int, previous=None) -> tuple:
    """Prune `loaded.model` in place with the engine; earlier masks stay pruned. Returns (masks, seconds, calib)."""
    calib = None
    if get_criterion(spec.method).needs_calibration or spec.extras()["layer_sparsity"] == "owl":
        src = load_text(recipe.data.calib, recipe.data.calib_split, data_dir=recipe.data.data_dir)
        calib = calibration_samples(loaded.tokenizer, src.text, spec.nsamples, spec.seqlen, seed, src.name)
    t0 = time.perf_counter()
    masks = prune(loaded.model, spec.method, spec.sparsity, pattern=spec.pattern, granularity=spec.granularity,
                  calib=calib, tokenizer=loaded.tokenizer, nsamples=spec.nsamples, seqlen=spec.seqlen,
                  skip=spec.skip, seed=seed, previous=previous, device=spec.device, batch_size=spec.calib_batch,
                  **spec.extras())
    seconds = time.perf_counter() - t0
    if previous is not None:  # prune() kept what was pruned before; layers it skipped keep their masks too
        for k, m in previous.items():
            masks[k] = masks[k] & m.to(masks[k].device) if k in masks else m
        masks.apply(loaded.model)
    desc = (f"{spec.nsamples} x {spec.seqlen} tokens of {recipe.data.calib}/{recipe.data.calib_split}, seed {seed}"
            if calib is not None else f"none ({spec.method})")
    return masks, seconds, desc


def streaming_checkpoint(model_spec: str, recipe, spec, out: Path | None = None):
    """The checkpoint to stream when this prune stage streams (asked, or the model does not fit the budget),
    else None. Refuses, before any work, a budget below one block and (with `out`) a disk without room for
    the output."""
    if spec.stream is False:
        return None
    path = local_hf_dir(model_spec)
    if path is None:
        if spec.stream:
            raise PrunetuneError(f"--stream reads a local Hugging Face directory of safetensors; '{model_spec}' "
                                 "is not one (download it first, or prune in memory)")
        return None
    try:
        ckpt = open_checkpoint(path)
    except PrunetuneError:
        if spec.stream:
            raise
        return None  # auto: what streaming cannot read (.bin) loads in memory as before
    crit = get_criterion(spec.method)
    plan = plan_memory(ckpt, resolve_dtype(recipe.model.dtype, ckpt.dtype()), nsamples=spec.nsamples,
                       seqlen=spec.seqlen, calib_batch=spec.calib_batch, hessian=crit.statistics == "hessian")
    budget = parse_bytes(spec.max_memory) if spec.max_memory else None
    if not decide(ckpt, spec.stream, budget, plan):
        return None
    if out is not None:
        check_disk(out, output_bytes(ckpt, recipe.model.dtype))
    return ckpt


def _stream_prune(state, out_dir: Path, ckpt) -> dict:
    """Prune `ckpt` block by block into out_dir/model (the in-memory stage's outputs, from disk)."""
    from transformers import AutoTokenizer

    spec, recipe, seed = state.spec, state.recipe, state.seed
    target = out_dir / "model"
    tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
    calib = None
    if get_criterion(spec.method).needs_calibration or spec.extras()["layer_sparsity"] == "owl":
        src = load_text(recipe.data.calib, recipe.data.calib_split, data_dir=recipe.data.data_dir)
        calib = calibration_samples(tokenizer, src.text, spec.nsamples, spec.seqlen, seed, src.name)
    names = chosen_layers(skeleton(ckpt, torch.float32))
    dense_hist = weight_histograms(None, names, read=lambda n: read_tensor(ckpt.tensors[f"{n}.weight"]))
    man = build_manifest(f"stage:{state.name}", {"recipe": recipe.name, "stage": state.name}, seed=seed + state.index)
    t0 = time.perf_counter()
    with atomic_dir(target, man) as tmp:
        res = prune_checkpoint(ckpt.path, tmp, spec.method, spec.sparsity, dtype=recipe.model.dtype,
                               device=spec.device, calib=calib, tokenizer=tokenizer, nsamples=spec.nsamples,
                               seqlen=spec.seqlen, seed=seed, batch_size=spec.calib_batch, pattern=spec.pattern,
                               granularity=spec.granularity, skip=spec.skip, previous=state.masks(),
                               **spec.extras())
        from transformers import AutoConfig

        write_model_card(tmp, man, {**card_info(recipe, state.index), "sparsity": res["sparsity"]},
                         AutoConfig.from_pretrained(tmp))
    seconds = time.perf_counter() - t0

    pruned = open_checkpoint(target)
    pruned_hist = weight_histograms(None, names, {n: h["edges"] for n, h in dense_hist.items()},
                                    read=lambda n: read_tensor(pruned.tensors[f"{n}.weight"]))
    dump(out_dir / "histograms.json", {"dense": dense_hist, "pruned": pruned_hist,
                                        "label_before": "before pruning", "label_after": "after pruning"})
    dump(out_dir / "layer_sparsity.json", res["layers"])
    desc = (f"{spec.nsamples} x {spec.seqlen} tokens of {recipe.data.calib}/{recipe.data.calib_split}, seed {seed}"
            if calib is not None else f"none ({spec.method})")
    return {"metrics": {
        "sparsity": zeros_metric(res["zeros"], res["numel"]),
        "prune_seconds": {"value": seconds, "protocol": {
            "method": spec.method, "pattern": spec.pattern,
            "granularity": resolve_granularity(spec.method, spec.granularity, spec.pattern),
            "calibration": desc, "device": spec.device or "cpu", "calib_batch": spec.calib_batch,
            "threads": torch.get_num_threads(), "streamed": True, "dtype": res["dtype"]}},
    }}


def run_prune(state, out_dir: Path) -> dict:
    """One-shot pruning through the engine; saves the pruned model, masks and dense/pruned histograms."""
    spec = state.spec
    ckpt = streaming_checkpoint(state.model_spec(), state.recipe, spec, out_dir)
    if ckpt is not None:
        return _stream_prune(state, out_dir, ckpt)
    loaded = state.load()
    names = chosen_layers(loaded.model)
    dense_hist = weight_histograms(loaded.model, names)
    masks, seconds, calib_desc = prune_model(loaded, state.recipe, spec, state.seed, state.masks())
    pruned_hist = weight_histograms(loaded.model, names, {n: h["edges"] for n, h in dense_hist.items()})
    dump(out_dir / "histograms.json", {"dense": dense_hist, "pruned": pruned_hist,
                                        "label_before": "before pruning", "label_after": "after pruning"})
    metric, layers = sparsity_metric(loaded.model)
    dump(out_dir / "layer_sparsity.json", layers)
    save_model(state, out_dir, loaded.model, loaded.tokenizer, masks)
    return {"metrics": {
        "sparsity": metric,
        "prune_seconds": {"value": seconds, "protocol": {"method": spec.method, "pattern": spec.pattern,
                                                         "granularity": resolve_granularity(spec.method, spec.granularity, spec.pattern),
                                                         "calibration": calib_desc, "device": spec.device or "cpu",
                                                         "calib_batch": spec.calib_batch,
                                                         "threads": torch.get_num_threads(), "streamed": False,
                                                         "dtype": str(next(loaded.model.parameters()).dtype)
                                                         .removeprefix("torch.")}},
    }}


register_stage(StageKind("prune", f"{PACKAGE}:run_prune", "prune", produces_model=True, reads=("data.calib",)))
