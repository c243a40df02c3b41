"""Write models as plain Hugging Face directories that `transformers` loads without prunetune.

Pruned weights are stored as real zeros in dense safetensors (that is what plain `transformers` can load);
masks go beside them (`masks.safetensors`) and a `manifest.json` says how the model was made.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from prunetune.errors import PrunetuneError
from prunetune.models.card import write_model_card
from prunetune.rundir import atomic_dir  # noqa: F401  (re-exported: callers used to import it from here)


def strip_quantization_config(model: torch.nn.Module) -> None:
    """GGUF loads leave a `quantization_config` that makes `save_pretrained` fail; the weights are fp32 now."""
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        try:
            delattr(cfg, "quantization_config")
        except AttributeError:
            cfg.quantization_config = None
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            try:
                setattr(model, attr, None)
            except Exception:
                pass
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except Exception:
            pass


def prepare_out_dir(out: Path | str, overwrite: bool = False) -> Path:
    """Refuse to write into a non-empty directory unless asked, so results are never silently mixed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PrunetuneError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PrunetuneError(f"output directory {out} exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def save_hf_dir(model: torch.nn.Module, tokenizer: Any, out: Path | str, manifest: dict | None = None,
                extra: Any = None, card: dict | None = None) -> Path:
    """Save weights (safetensors), config, tokenizer, manifest and model card atomically: temp dir, then rename.

    `extra(tmp_dir)`, when given, writes more files (e.g. masks) before the rename: all appear or none.
    `card` (base model, method, sparsity, ...; see `models.card`) completes the `README.md` model card that
    every export carries, so the directory can be pushed to a model hub as it is.
    """
    with atomic_dir(out, manifest) as tmp:
        strip_quantization_config(model)
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        write_model_card(tmp, manifest, card, getattr(model, "config", None))
    return Path(out)


# ------------------------------------------------------------------------------------- LoRA with masks
@torch.no_grad()
def merge_lora_keep_masks(peft_model: torch.nn.Module, masks: Any = None) -> torch.nn.Module:
    """Fold LoRA into the base weights and re-apply the masks: W' = (W + s*BA) ⊙ M.

    A plain `merge_and_unload` adds the dense update s*BA to every weight and so destroys the sparsity
    (the bug of the original PAYT code); masking after the merge keeps exactly the pruned zeros. The peft
    model is consumed (its base weights now hold the merged values); a plain transformers model is returned.
    """
    merged = peft_model.merge_and_unload() if hasattr(peft_model, "merge_and_unload") else peft_model
    if masks is not None and len(masks):
        masks.apply(merged)
    return merged


def save_adapter_export(peft_model: torch.nn.Module, tokenizer: Any, out: Path | str, masks: Any = None,
                        manifest: dict | None = None, card: dict | None = None) -> Path:
    """Adapter export: the sparse base as a plain HF dir in `out/base`, the peft adapter in `out/adapter`.

    Users who keep several task adapters on one sparse base load the base with transformers and attach an
    adapter with `PeftModel.from_pretrained(base, out/"adapter")`.
    """
    with atomic_dir(out, manifest) as tmp:
        peft_model.save_pretrained(tmp / "adapter", safe_serialization=True)
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            state = {k.replace("base_layer.", ""): v for k, v in base.state_dict().items()
                     if "lora_" not in k and "modules_to_save" not in k}
        state = {k.replace("original_module.", ""): v for k, v in state.items()}
        seen: set[int] = set()
        for k in list(state):  # tied weights (embeddings / LM head) are stored once, as transformers does
            ptr = state[k].data_ptr()
            if ptr in seen:
                del state[k]
            seen.add(ptr)
        cfg = base.config
        strip_quantization_config(base)
        from safetensors.torch import save_file

        (tmp / "base").mkdir()
        cfg.save_pretrained(tmp / "base")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "base" / "model.safetensors"),
                  metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "base")
        if masks is not None and len(masks):
            masks.save(tmp / "base")

        write_model_card(tmp / "base", manifest, card, cfg)
    return Path(out)
