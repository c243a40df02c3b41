"""Write models as plain Hugging Face directories that `transformers` loads without prunetune.

Pruned weights are stored as real zeros in dense safetensors (that is what plain `transformers` can load);
masks go beside them (`masks.safetensors`) and a `manifest.json` says how the model was made.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from prunetune.errors import PrunetuneError


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


def save_hf_dir(model: torch.nn.Module, tokenizer: Any, out: Path | str, manifest: dict | None = None) -> Path:
    """Save weights (safetensors), config, tokenizer and manifest atomically: temp dir, then rename."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    strip_quantization_config(model)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if manifest is not None:
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
