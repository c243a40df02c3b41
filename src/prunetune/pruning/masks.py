"""`MaskSet`: the single truth of sparsity.

A mask is a bool tensor shaped like a linear layer's weight, **True = keep**. Masks are keyed by the module
name in the plain (un-wrapped) transformers model, so the same MaskSet applies to the model, to its peft
wrapper (the frozen `base_layer` behind LoRA) and to a reloaded checkpoint. Masks live on their weight's
device once applied (saved to disk from the CPU). Pruned weights are real zeros:
`sparsity_report` counts zeros in the weights, never mask bookkeeping, so it cannot lie.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, MutableMapping
from pathlib import Path

import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.models.arch import base_linear, get_adapter, unwrap

MASKS_FILE = "masks.safetensors"


def _is_dtensor(t: torch.Tensor) -> bool:
    """Whether `t` is a distributed tensor (an FSDP2-sharded parameter)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _module(model: nn.Module, name: str) -> nn.Linear:
    root = unwrap(model)
    try:
        mod = root.get_submodule(name)
    except AttributeError:
        raise PrunetuneError(f"mask for '{name}' does not match any module of the model") from None
    return base_linear(mod)


class PackedMask:
    """A keep-mask stored one bit per weight (1/8 of a bool tensor), for masks that are kept but rarely read.

    One-shot pruning keeps a mask for every pruned layer although nothing reads them until fine-tuning or
    saving: as bool tensors they were 0.20x the fp32 model of resident memory (106 MiB on SmolLM2-135M), as
    bits 0.025x. `unpack()` gives back exactly the bool tensor that was packed (same shape, same device).
    """

    __slots__ = ("bits", "shape")
    _SHIFTS: dict[torch.device, torch.Tensor] = {}

    def __init__(self, mask: torch.Tensor) -> None:
        flat = mask.detach().reshape(-1).to(torch.uint8)
        pad = (-flat.numel()) % 8
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        self.shape = tuple(mask.shape)
        self.bits = (flat.view(-1, 8) << self._shifts(flat.device)).sum(1, dtype=torch.uint8)

    @classmethod
    def from_bits(cls, bits: torch.Tensor, shape: Iterable[int]) -> PackedMask:
        """A mask read back from its bits (as `masks.safetensors` stores them when written packed)."""
        out = cls.__new__(cls)
        out.shape = tuple(int(d) for d in shape)
        if bits.dtype != torch.uint8 or bits.numel() != -(-math.prod(out.shape) // 8):
            raise PrunetuneError(f"packed mask of {bits.numel()} bytes does not hold shape {out.shape}")
        out.bits = bits.reshape(-1)
        return out

    @classmethod
    def _shifts(cls, device: torch.device) -> torch.Tensor:
        if device not in cls._SHIFTS:
            cls._SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
        return cls._SHIFTS[device]

    @property
    def device(self) -> torch.device:
        return self.bits.device

    def numel(self) -> int:
        return math.prod(self.shape)

    def unpack(self, device: torch.device | str | None = None) -> torch.Tensor:
        bits = self.bits if device is None else self.bits.to(device)
        flat = ((bits.unsqueeze(1) >> self._shifts(bits.device)) & 1).to(torch.bool).reshape(-1)
        return flat[: self.numel()].view(self.shape)

    def count_kept(self) -> int:
        """Set bits, counted without unpacking the whole mask at once."""
        table = _POPCOUNT.to(self.bits.device)
        return int(table[self.bits.long()].sum())


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


class _MaskStore(MutableMapping):
    """name -> bool keep-mask, where an entry may be held bit-packed until it is first read.

    Reading an entry (`store[name]`, `.get`, `.items()`, what fine-tuning does at every step) unpacks it once
    and keeps the bool tensor, so training pays the unpacking once per layer; `MaskSet`'s own counting and
    saving read packed entries without keeping them unpacked.
    """

    def __init__(self) -> None:
        self._data: dict[str, torch.Tensor | PackedMask] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        v = self._data[name]
        if isinstance(v, PackedMask):
            v = self._data[name] = v.unpack()
        return v

    def __setitem__(self, name: str, mask: torch.Tensor | PackedMask) -> None:
        self._data[name] = mask if isinstance(mask, PackedMask) else mask.to(torch.bool)

    def __delitem__(self, name: str) -> None:
        del self._data[name]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def raw(self, name: str) -> torch.Tensor | PackedMask:
        """The entry as stored (a PackedMask stays packed)."""
        return self._data[name]

    def peek(self, name: str) -> torch.Tensor:
        """The bool mask without keeping an unpacked copy (a temporary for packed entries)."""
        v = self._data[name]
        return v.unpack() if isinstance(v, PackedMask) else v


class MaskSet:
    """name -> keep-mask. Apply it once to prune, `enforce` it after every optimizer step to stay pruned.

    `set_packed(name, mask)` stores a mask bit-packed (what `prune()` does): every read still returns the
    same bool tensor, unpacked on first read.
    """

    def __init__(self, masks: dict[str, torch.Tensor] | None = None) -> None:
        self.masks = _MaskStore()
        self._shards: dict[str, tuple[object, torch.Tensor]] = {}  # name -> (the mask it was cut from, shard)
        for k, v in (masks or {}).items():
            self.masks[k] = v

    # -- container -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.masks)

    def __contains__(self, name: str) -> bool:
        return name in self.masks

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.masks[name]

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        self.masks[name] = mask.to(torch.bool)

    def set_packed(self, name: str, mask: torch.Tensor) -> None:
        """Store `mask` one bit per weight; reads return it unchanged (unpacked on first read)."""
        self.masks[name] = PackedMask(mask.to(torch.bool))

    def is_packed(self, name: str) -> bool:
        return isinstance(self.masks.raw(name), PackedMask)

    def items(self):
        return self.masks.items()

    def names(self) -> list[str]:
        return list(self.masks)

    def update(self, other: MaskSet) -> None:
        if isinstance(other, MaskSet):
            for k in other.names():
                self.masks[k] = other.masks.raw(k)  # packed entries stay packed
            return
        for k, v in other.items():
            self[k] = v

    # -- model side -----------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero every weight outside its mask (idempotent; cheap enough to call after each optimizer step).

        A mask found on another device than its weight is moved there once and kept there, so enforcing after
        every step copies nothing host->device; the bool mask multiplies in place without a float copy.
        """
        for name in self.masks:
            w = _module(model, name).weight
            raw = self.masks.raw(name)
            if tuple(w.shape) != tuple(raw.shape):
                flat = " (FSDP1 flattens parameters: use FSDP2, fsdp_version: 2)" if w.dim() < len(raw.shape) else ""
                raise PrunetuneError(f"mask for '{name}' has shape {tuple(raw.shape)}, weight {tuple(w.shape)}{flat}")
            if w.device.type == "meta":  # a rank whose weights arrive later (FSDP's RAM-efficient loading)
                continue
            if _is_dtensor(w):
                w.to_local().mul_(self._shard(name, w))
                continue
            mask = self.masks[name]  # unpacked once and kept: enforcing every step unpacks nothing
            if mask.device != w.device:
                mask = self.masks[name] = mask.to(w.device)
            w.mul_(mask)

    enforce = apply

    def _shard(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """This rank's part of mask `name`, laid out like the sharded weight `w` (an FSDP2 DTensor).

        Under FSDP2 each rank holds a shard of every weight (rows split across ranks, as `torch.chunk` splits
        them). Re-zeroing multiplies that local shard by the same rows of the mask, so no rank ever gathers
        a weight, and only the shard of the mask sits on the device (the full masks stay where they were:
        checkpoints and the export save them). Cut once per mask; cut again when the mask is replaced.
        """
        from torch.distributed.tensor import distribute_tensor

        raw = self.masks.raw(name)
        cached = self._shards.get(name)
        if cached is None or cached[0] is not raw:
            full = self.masks.peek(name).to(w.device)
            local = distribute_tensor(full, w.device_mesh, w.placements, src_data_rank=None).to_local()
            cached = self._shards[name] = (raw, local.contiguous())
        return cached[1]

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: nn.Module, names: Iterable[str] | None = None) -> MaskSet:
        """Re-derive masks from the zeros in the weights (what a plain reloaded checkpoint carries)."""
        if names is None:
            names = get_adapter(model).linears().keys()
        return cls({n: _module(model, n).weight != 0 for n in names})

    # -- numbers --------------------------------------------------------------------------------------
    def _kept(self, name: str) -> tuple[int, int]:
        raw = self.masks.raw(name)
        if isinstance(raw, PackedMask):
            return raw.count_kept(), raw.numel()
        return int(raw.sum()), raw.numel()

    def sparsity(self) -> float:
        counts = [self._kept(k) for k in self.masks]
        total = sum(n for _, n in counts)
        kept = sum(k for k, _ in counts)
        return 1.0 - kept / total if total else 0.0

    def layer_sparsity(self) -> dict[str, float]:
        out = {}
        for k in self.masks:
            kept, n = self._kept(k)
            out[k] = 1.0 - kept / n if n else 0.0
        return out

    # -- disk -----------------------------------------------------------------------------------------
    def save(self, path: Path | str, metadata: dict | None = None) -> Path:
        """safetensors (bool stored as uint8); `path` may be a directory, then masks.safetensors inside."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / MASKS_FILE
        meta = self.file_metadata(packed=False)
        if metadata:
            meta["info"] = json.dumps(metadata, default=str)
        tensors = {k: self.masks.peek(k).to(torch.uint8).contiguous().cpu() for k in self.masks}
        save_file(tensors, str(path), metadata=meta)
        return path

    @staticmethod
    def file_metadata(packed: bool, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, str]:
        """The safetensors metadata of a mask file; a packed one stores one bit per weight and the shapes."""
        meta = {"format": "prunetune-masks", "convention": "1 = keep"}
        if packed:
            meta.update(packing="bits, least significant first, row-major", shapes=json.dumps(shapes or {}))
        return meta

    @classmethod
    def load(cls, path: Path | str) -> MaskSet:
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if path.is_dir():
            path = path / MASKS_FILE
        if not path.is_file():
            raise PrunetuneError(f"mask file {path} does not exist")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:
            raise PrunetuneError(f"cannot read mask file {path}: {exc}") from None
        if "packing" not in meta:
            return cls({k: v.to(torch.bool) for k, v in tensors.items()})
        shapes = json.loads(meta.get("shapes", "{}"))
        out = cls()
        for k, bits in tensors.items():
            if k not in shapes:
                raise PrunetuneError(f"mask file {path}: no shape recorded for packed mask '{k}'")
            out.masks[k] = PackedMask.from_bits(bits, shapes[k])
        return out


def packed_masks_header(shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of each tensor of a packed mask file, known before any mask exists."""
    return [(n, torch.uint8, (-(-math.prod(s) // 8),)) for n, s in shapes.items()]


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
