"""`MaskSet`: the single truth of sparsity.

A mask is a bool tensor shaped like a linear layer's weight, **True = keep**. Masks are keyed by the module
name in the plain (un-wrapped) transformers model, so the same MaskSet applies to the model, to its peft
wrapper (the frozen `base_layer` behind LoRA) and to a reloaded checkpoint. Masks live on their weight's
device once applied (saved to disk from the CPU). Pruned weights are real zeros:
`sparsity_report` counts zeros in the weights, never mask bookkeeping, so it cannot lie.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.models.arch import base_linear, get_adapter, unwrap

MASKS_FILE = "masks.safetensors"


def _module(model: nn.Module, name: str) -> nn.Linear:
    root = unwrap(model)
    try:
        mod = root.get_submodule(name)
    except AttributeError:
        raise PrunetuneError(f"mask for '{name}' does not match any module of the model") from None
    return base_linear(mod)


class MaskSet:
    """name -> keep-mask. Apply it once to prune, `enforce` it after every optimizer step to stay pruned."""

    def __init__(self, masks: dict[str, torch.Tensor] | None = None) -> None:
        self.masks: dict[str, torch.Tensor] = {k: v.to(torch.bool) for k, v in (masks or {}).items()}

    # -- container -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.masks)

    def __contains__(self, name: str) -> bool:
        return name in self.masks

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.masks[name]

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        self.masks[name] = mask.to(torch.bool)

    def items(self):
        return self.masks.items()

    def names(self) -> list[str]:
        return list(self.masks)

    def update(self, other: MaskSet) -> None:
        for k, v in other.items():
            self[k] = v

    # -- model side -----------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero every weight outside its mask (idempotent; cheap enough to call after each optimizer step).

        A mask found on another device than its weight is moved there once and kept there, so enforcing after
        every step copies nothing host->device; the bool mask multiplies in place without a float copy.
        """
        for name, mask in self.masks.items():
            w = _module(model, name).weight
            if w.shape != mask.shape:
                raise PrunetuneError(f"mask for '{name}' has shape {tuple(mask.shape)}, weight {tuple(w.shape)}")
            if mask.device != w.device:
                mask = self.masks[name] = mask.to(w.device)
            w.mul_(mask)

    enforce = apply

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: nn.Module, names: Iterable[str] | None = None) -> MaskSet:
        """Re-derive masks from the zeros in the weights (what a plain reloaded checkpoint carries)."""
        if names is None:
            names = get_adapter(model).linears().keys()
        return cls({n: _module(model, n).weight != 0 for n in names})

    # -- numbers --------------------------------------------------------------------------------------
    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0

    def layer_sparsity(self) -> dict[str, float]:
        return {k: 1.0 - float(m.float().mean()) for k, m in self.masks.items()}

    # -- disk -----------------------------------------------------------------------------------------
    def save(self, path: Path | str, metadata: dict | None = None) -> Path:
        """safetensors (bool stored as uint8); `path` may be a directory, then masks.safetensors inside."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / MASKS_FILE
        meta = {"format": "prunetune-masks", "convention": "1 = keep"}
        if metadata:
            meta["info"] = json.dumps(metadata, default=str)
        tensors = {k: v.to(torch.uint8).contiguous().cpu() for k, v in self.masks.items()}
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: Path | str) -> MaskSet:
        from safetensors.torch import load_file

        path = Path(path)
        if path.is_dir():
            path = path / MASKS_FILE
        if not path.is_file():
            raise PrunetuneError(f"mask file {path} does not exist")
        try:
            tensors = load_file(str(path))
        except Exception as exc:
            raise PrunetuneError(f"cannot read mask file {path}: {exc}") from None
        return cls({k: v.to(torch.bool) for k, v in tensors.items()})


@torch.no_grad()
def sparsity_report(model: nn.Module) -> dict:
    """Real zeros per prunable linear layer and in total (zeros already in the checkpoint count too)."""
    layers = {}
    zeros = total = 0
    for name, (role, lin) in get_adapter(model).linears().items():
        w = lin.weight
        z = int(w.numel() - torch.count_nonzero(w))
        layers[name] = {"role": role, "shape": list(w.shape), "zeros": z, "sparsity": z / w.numel()}
        zeros += z
        total += w.numel()
    return {"layers": layers, "zeros": zeros, "numel": total, "sparsity": zeros / total if total else 0.0}
