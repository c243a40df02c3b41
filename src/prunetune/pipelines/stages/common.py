"""What every stage shares: saving a stage's model, the sparsity metric, the model card, resuming."""

from __future__ import annotations

import json
from pathlib import Path

from prunetune.manifest import build_manifest
from prunetune.models.export import save_hf_dir
from prunetune.pruning.masks import sparsity_report
from prunetune.registry import stage_kind


TUNE_DIR = "tune"  # a training stage's tuning run: out_dir/tune (logs, metrics, checkpoints/)


def resumable_checkpoint(stage_type: str, out_dir: Path) -> tuple[Path | None, list[str]]:
    """The last complete checkpoint of an interrupted stage's training in `out_dir` (None: the stage starts
    over) and why newer checkpoints were passed over. A resumable stage (`StageKind.resumable`) saves its
    method's own state, such as LoSparse's PLATON averages, in each checkpoint through the method lifecycle."""
    if not stage_kind(stage_type).resumable:
        return None, []
    # inside: tuning.finetune loads transformers' Trainer, peft and datasets (about 120 MiB resident), which a
    # run without a training stage (`prunetune prune`) must not carry through its pruning peak
    from prunetune.tuning.finetune import CHECKPOINTS, last_good_checkpoint

    return last_good_checkpoint(out_dir / TUNE_DIR / CHECKPOINTS)


def dump(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str))


def zeros_metric(zeros: int, numel: int) -> dict:
    """The `sparsity` metric from counted zeros (in memory or, for a streamed model, tensor by tensor)."""
    return {"value": zeros / numel if numel else 0.0, "protocol": {
        "what": "share of exact zeros in the weights of the prunable linear layers (attention + MLP)",
        "zeros": zeros, "numel": numel}}


def sparsity_metric(model) -> tuple[dict, dict]:
    """Real-zero sparsity of the prunable linears (the metric) and the per-layer report (for plots)."""
    rep = sparsity_report(model)
    metric = zeros_metric(rep["zeros"], rep["numel"])
    layers = {n: {"role": r["role"], "sparsity": r["sparsity"]} for n, r in rep["layers"].items()}
    return metric, layers


def card_info(recipe, upto: int, model=None) -> dict:
    """What the model card of a model made by stages 0..`upto` of `recipe` says: the original model, the
    methods in order ("wanda+payt-l1-global"), N:M pattern, whether structures were removed, the real-zero
    sparsity of `model` (when given). Derived from the recipe, so every export of a run describes it alike."""
    methods: list[str] = []
    tags: list[str] = []
    pattern = None
    structured = False
    for i, st in enumerate(recipe.stages[: upto + 1]):
        spec = recipe.stage_spec(i)
        if st.type == "prune":
            methods.append(spec.method)
            pattern = spec.pattern or pattern
            structured |= (spec.granularity or "") in ("rows", "cols", "heads", "neurons")
        elif st.type == "structured":
            methods.append(f"{spec.method}-structured")
            structured = True
            tags.append("shrunk")
        elif st.type == "payt":
            methods.append(f"payt-{spec.criterion}")
        elif st.type == "losparse":
            methods.append("losparse")
        elif st.type == "compose":
            methods.append("composable")
            structured = True
        elif st.type == "finetune":
            tags.append("lora" if spec.mode == "lora" else "fine-tuned")
    card = {"base_model": recipe.model.name, "method": "+".join(methods) or None, "pattern": pattern,
            "structured": structured, "tags": tags, "title": f"{recipe.name}: {recipe.model.name}",
            "details": {"recipe": recipe.name, "stages": [st.name or st.type for st in recipe.stages[: upto + 1]]}}
    if model is not None:
        card["sparsity"] = sparsity_report(model)["sparsity"]
    return card


def save_model(state, out_dir: Path, model, tokenizer, masks, extra: dict | None = None,
               metrics: dict | None = None) -> Path:
    """The stage's model as a plain HF dir with its masks and model card beside the weights (all atomic)."""
    target = out_dir / "model"
    man = build_manifest(f"stage:{state.name}", {"recipe": state.recipe.name, "stage": state.name},
                         seed=state.seed + state.index, extra=extra,
                         metrics={h["stage"]: h["metrics"] for h in getattr(state, "history", [])} | (metrics or {}))
    keep = masks if masks is not None and len(masks) else None
    save_hf_dir(model, tokenizer, target, man, extra=(lambda tmp: keep.save(tmp)) if keep is not None else None,
                card=card_info(state.recipe, state.index, model))
    return target
