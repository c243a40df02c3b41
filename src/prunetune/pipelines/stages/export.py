"""The `export` stage: the plain HF directory (masks, model card) of the run's model."""

from __future__ import annotations

from pathlib import Path

import torch

from prunetune.evaluation.speed import size_on_disk
from prunetune.manifest import build_manifest
from prunetune.models.arch import get_adapter, nonzero_count, parameter_count
from prunetune.models.card import CARD_FILE, write_model_card
from prunetune.models.export import save_hf_dir
from prunetune.pipelines.stages.common import card_info, sparsity_metric, zeros_metric
from prunetune.pruning.masks import MASKS_FILE
from prunetune.pruning.stream import iter_row_chunks, open_checkpoint, skeleton
from prunetune.registry import StageKind, register_stage
from prunetune.rundir import atomic_dir

PACKAGE = "prunetune.pipelines.stages"  # stages are looked up on the package (tests patch them there)


def run_export(state, out_dir: Path) -> dict:
    """The final model as a plain HF dir (zeros in the weights, masks beside), plus size on disk."""
    target = state.out / "model"
    man = build_manifest("export", {"recipe": state.recipe.name, "from": state.model_spec()},
                         seed=state.recipe.seed, metrics={h["stage"]: h["metrics"] for h in state.history})
    if model_streamed(state):  # too large to load: the streamed stage's files are the export
        metric, counts = _export_files(state.model_dir, target, man, card_info(state.recipe, state.index))
    else:
        loaded = state.load()
        masks = state.masks()
        save_hf_dir(loaded.model, loaded.tokenizer, target, man,  # masks and card inside the atomic write
                    extra=(lambda tmp: masks.save(tmp)) if masks is not None else None,
                    card=card_info(state.recipe, state.index, loaded.model))
        metric, _ = sparsity_metric(loaded.model)
        counts = {"value": nonzero_count(loaded.model), "protocol": {"parameters": parameter_count(loaded.model)}}

    size = size_on_disk(target)
    mask_bytes = (target / MASKS_FILE).stat().st_size if (target / MASKS_FILE).is_file() else 0
    (out_dir / "exported_to").write_text(str(target))
    return {"metrics": {
        "sparsity": metric,
        "size_on_disk_mb": {"value": (size["bytes"] - mask_bytes) / 2**20, "protocol": {
            "format": size["format"], "what": "model weights (dense safetensors holding the zeros)",
            "masks_mb": mask_bytes / 2**20}},
        "nonzero_parameters": counts,
    }, "artifacts": {"model": str(target)}}


register_stage(StageKind("export", f"{PACKAGE}:run_export", None))


def model_streamed(state) -> bool:
    """Whether the current model was written by a streaming prune stage (so it is not loaded whole)."""
    for h in reversed(state.history):
        if h.get("produces_model"):
            return bool(h["metrics"].get("prune_seconds", {}).get("protocol", {}).get("streamed"))
    return False


@torch.no_grad()
def _export_files(src: Path, target: Path, manifest: dict, card: dict) -> tuple[dict, dict]:
    """Export a streamed model by linking (or copying) its files; zeros counted one tensor at a time."""
    import os
    import shutil

    from transformers import AutoConfig

    ckpt = open_checkpoint(src)
    linears = {f"{n}.weight" for n in get_adapter(skeleton(ckpt, torch.float32)).linears()}
    params = nonzero = zeros = numel = 0
    for name, info in ckpt.tensors.items():  # in row chunks: an embedding table is never whole in memory
        for _, chunk in iter_row_chunks(info):
            nz = int(torch.count_nonzero(chunk))
            params, nonzero = params + chunk.numel(), nonzero + nz
            if name in linears:
                zeros, numel = zeros + chunk.numel() - nz, numel + chunk.numel()
    metric = zeros_metric(zeros, numel)
    with atomic_dir(target, manifest) as tmp:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name not in ("manifest.json", CARD_FILE):
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
        write_model_card(tmp, manifest, {**card, "sparsity": metric["value"]}, AutoConfig.from_pretrained(src))
    return metric, {"value": nonzero, "protocol": {"parameters": params}}
