"""Fine-tuning under FSDP2 (`accelerate launch --config_file configs/accelerate/fsdp.yaml`).

FSDP2 (`torch.distributed.fsdp.fully_shard`) keeps every parameter as a DTensor: each rank holds a shard of
rows, in the weight's original shape. What prunetune needs on top of the Trainer's FSDP support:

- masks enforced on each rank's shard after every optimizer step (`MaskSet.apply` cuts the mask like the
  weight, `pruning.masks`), never gathering a weight;
- every rank holding the same masks although only rank 0 loaded real weights (accelerate's RAM-efficient
  loading leaves the other ranks' models on the meta device until it sends them their shards);
- after training, the whole model gathered once to rank 0's CPU memory as a full state dict, loaded into a
  weightless copy of the module taken before sharding: rank 0 then merges LoRA, evaluates and exports a
  plain model exactly as in a single process, and the other ranks stop.

FSDP1 (flat parameters) is not supported: its parameters lose their shapes, so masks cannot address them.
Training-time methods (PAYT, LoSparse, VIB), general-text mixing and a separate KD teacher are refused under
FSDP: each would read or hold the whole model on every rank.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.models.arch import unwrap


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (`accelerate launch` with an FSDP config sets this for every rank)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_fsdp_run(*, method: Any, kd: bool, lora: bool, teacher: str, teacher_model: Any, mix: float,
                   task: str) -> None:
    """Refuse, in one line and before anything loads, what fine-tuning does not support under FSDP."""
    if not fsdp_requested():
        return
    if method is not None:
        raise PrunetuneError(f"method '{method.name}' does not run under FSDP yet: launch it with torchrun or "
                             "`accelerate launch --multi_gpu` (data parallel), or fine-tune without the method")
    if task == "seq2seq":
        raise PrunetuneError("seq2seq fine-tuning does not run under FSDP yet: launch it data parallel")
    if mix > 0:
        raise PrunetuneError("--mix labels general text with the model before training, which under FSDP only "
                             "rank 0 holds: turn mixing off (--mix 0) or launch data parallel")
    if kd and (teacher_model is not None or not lora or teacher != "initial"):
        raise PrunetuneError("under FSDP a KD teacher can only be LoRA's own frozen base (--lora --teacher "
                             "initial): a separate teacher would be a whole unsharded model on every rank; "
                             "or fine-tune without KD (--no-kd)")


def weightless_copy(model: nn.Module, share: tuple = ()) -> nn.Module:
    """A copy of `model` whose parameters are on the meta device (no memory), buffers copied for real.

    Taken before FSDP shards the model in place; after training the gathered full state dict is loaded into
    it (`gather_full_model`). Objects in `share` (the MaskSet that masked LoRA layers read) stay shared.
    """
    memo: dict[int, Any] = {id(o): o for o in share}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def gather_full_model(sharded: nn.Module, skeleton: nn.Module | None) -> nn.Module | None:
    """Gather the FSDP2 model's full state dict to rank 0's CPU and load it into `skeleton` (rank 0's
    `weightless_copy`). Every rank must call it (the gathering is collective); non-zero ranks get None."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if skeleton is None:
        return None
    skeleton.load_state_dict(state, strict=True, assign=True)
    root = unwrap(skeleton)
    if getattr(getattr(root, "config", None), "tie_word_embeddings", False) and hasattr(root, "tie_weights"):
        root.tie_weights()  # assign=True replaced the shared tensor by two copies
    return skeleton


def model_on_meta(model: nn.Module) -> bool:
    """Whether this rank's model has no weights yet (FSDP's RAM-efficient loading on ranks other than 0)."""
    return any(p.device.type == "meta" for p in model.parameters())
