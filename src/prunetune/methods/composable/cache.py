"""The safetensors cache of trained units, keyed by everything a unit depends on (model, data, the module-level
fine-tuning settings of the `compose` spec, unit).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from prunetune.methods.composable.plan import Unit
from prunetune.methods.composable.spec import ComposeSpec
from prunetune.models.arch import unwrap
from prunetune.models.loading import cache_dir
from prunetune.rundir import atomic_write_bytes, atomic_write_text


# Criteria are the registry's (`pruning.criteria`): a linear unit takes any that scores weights from the weights
# or input column norms (l1 = l1-global's |W|, wanda, ...), a head any that scores structures from the weights
# (l1: |W|, l2: W², summed per head).
CACHE_FORMAT = 1


def module_ft_settings(spec: ComposeSpec, seed: int = 0) -> dict:
    """What module-level fine-tuning depends on beyond the model, the data and the unit: the spec's steps and
    learning rates, its `module_batch` (sequences per attention-unit step, recorded as `attention_batch`) and the
    seed. Every cache key hashes this dict and results record it (`settings`); its keys and their order are the
    ones caches have always been written with, so an entry written before is found again."""
    return {"linear_steps": spec.linear_steps, "linear_lr": spec.linear_lr, "attention_steps": spec.attention_steps,
            "attention_lr": spec.attention_lr, "attention_batch": spec.module_batch, "seed": seed}


def tensor_hash(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes()
                 if t.dtype != torch.bool else t.cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def model_hash(model: nn.Module) -> str:
    """Hash of every weight (name, shape, bytes): a cache entry can only ever be reused for the same model."""
    return tensor_hash(sorted(unwrap(model).state_dict().items()))


def data_hash(batches: Sequence[dict]) -> str:
    return tensor_hash((f"{i}.{k}", v) for i, b in enumerate(batches) for k, v in sorted(b.items())
                       if isinstance(v, torch.Tensor))


def default_cache_dir() -> Path:
    return cache_dir() / "composable"


class ModuleCache:
    """Fine-tuned units on disk: `<key>.safetensors` (weights + masks) and `<key>.json` (what the key hashes)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def key(self, unit: Unit, model_h: str, data_h: str, spec: ComposeSpec, seed: int = 0) -> tuple[str, dict]:
        """The entry's key and what it hashes: the model, the data, the unit and `module_ft_settings`."""
        meta = {"format": CACHE_FORMAT, "model": model_h, "data": data_h, "unit": asdict(unit),
                "settings": module_ft_settings(spec, seed)}
        return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24], meta

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        p = self.path(key)
        if not (p.is_file() and p.with_suffix(".json").is_file()):
            self.misses += 1
            return None
        try:
            out = load_file(str(p))
        except Exception:  # a torn or foreign file is a miss, never a crash
            self.misses += 1
            return None
        self.hits += 1
        return out

    def put(self, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
        """Tensors first, then the JSON that completes the entry, each written durably and renamed into place
        (`rundir.atomic_write_bytes`): a process killed in between leaves tensors without their JSON, which
        `get` counts as a miss, so the unit is trained and written again, never loaded half-made."""
        from safetensors.torch import save

        self.root.mkdir(parents=True, exist_ok=True)
        p = self.path(key)
        atomic_write_bytes(p, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                                   metadata={"format": "prunetune-composable-unit"}))
        atomic_write_text(p.with_suffix(".json"), json.dumps(meta, indent=2, default=str))
        return p
