"""Module-level fine-tuning settings and the safetensors cache of trained units, keyed by everything a unit depends
on (model, data, settings, unit).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from prunetune.methods.composable.plan import Unit
from prunetune.models.arch import unwrap
from prunetune.models.loading import cache_dir
from prunetune.rundir import atomic_write_bytes, atomic_write_text


# Criteria are the registry's (`pruning.criteria`): a linear unit takes any that scores weights from the weights
# or input column norms (l1 = l1-global's |W|, wanda, ...), a head any that scores structures from the weights
# (l1: |W|, l2: W², summed per head).
CACHE_FORMAT = 1


@dataclass(frozen=True)
class ModuleFTSettings:
    """Module-level fine-tuning settings; every field is part of the cache key."""

    linear_steps: int = 150
    linear_lr: float = 1e-3
    attention_steps: int = 60
    attention_lr: float = 5e-4
    attention_batch: int = 8  # sequences per attention-unit step
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


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

    def key(self, unit: Unit, model_h: str, data_h: str, settings: ModuleFTSettings) -> tuple[str, dict]:
        meta = {"format": CACHE_FORMAT, "model": model_h, "data": data_h, "unit": asdict(unit),
                "settings": settings.to_dict()}
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
