"""LoRA / rsLoRA through peft, with targets taken from the architecture adapter.

Targets are the *exact* module names of the prunable linears (by role), so LoRA sits on precisely the
layers that pruning masks, for every family, and no regex per model has to be maintained. A new task head
(classifier / score) is trained in full (`modules_to_save`), since it starts random.
"""

from __future__ import annotations

from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.models.arch import get_adapter, unwrap

DEFAULT_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
HEAD_NAMES = ("classifier", "score")


def check_lora(rank: int, alpha: float, dropout: float) -> None:
    if rank < 1:
        raise PrunetuneError(f"--lora-rank must be >= 1, got {rank}")
    if alpha <= 0:
        raise PrunetuneError(f"--lora-alpha must be > 0, got {alpha}")
    if not (0.0 <= dropout < 1.0):
        raise PrunetuneError(f"--lora-dropout must be in [0, 1), got {dropout}")


def task_heads(model: nn.Module) -> list[str]:
    """Top-level names of task heads that are new for the task and must be trained fully."""
    root = unwrap(model)
    return [n for n in HEAD_NAMES if isinstance(getattr(root, n, None), nn.Module)]


def lora_config(model: nn.Module, task: str, rank: int = 8, alpha: float = 16.0, dropout: float = 0.05,
                rslora: bool = False, roles: tuple[str, ...] = DEFAULT_ROLES):
    """A peft `LoraConfig` whose targets are this model's prunable linears of the given roles."""
    from peft import LoraConfig, TaskType

    check_lora(rank, alpha, dropout)
    targets = [name for name, (role, _) in get_adapter(model).linears().items() if role in roles]
    if not targets:
        raise PrunetuneError(f"no linear layer of roles {', '.join(roles)} in this model to put LoRA on")
    task_type = {"seq-cls": TaskType.SEQ_CLS, "causal-lm": TaskType.CAUSAL_LM}.get(task)
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora,
                      target_modules=targets, modules_to_save=task_heads(model) or None, task_type=task_type,
                      bias="none")


def apply_lora(model: nn.Module, task: str, **kw) -> nn.Module:
    """Wrap `model` with LoRA adapters (base weights frozen); returns the peft model."""
    import warnings

    from peft import get_peft_model

    cfg = lora_config(model, task, **kw)
    with warnings.catch_warnings():  # peft asks transformers v5 a deprecated question; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, cfg)


def is_peft(model: nn.Module) -> bool:
    return unwrap(model) is not model


def lora_scale(rank: int, alpha: float, rslora: bool) -> float:
    """s in W + s*BA: alpha/r (LoRA) or alpha/sqrt(r) (rsLoRA, stable for large ranks)."""
    return alpha / (rank**0.5 if rslora else rank)


def mask_lora_updates(peft_model: nn.Module, masks) -> int:
    """Make LoRA layers compute W⊙M·x + ((s·BA)⊙M)·x, i.e. train exactly the weight that will be exported.

    Plain LoRA adds the dense update s·BA, so the merged-and-masked export (W + s·BA) ⊙ M would differ from
    the model that was trained and evaluated. Masking the update in the forward pass closes that gap: the
    predictions before and after the merge are the same. Layers without a mask (yet: PAYT adds masks as it
    goes, the lookup is live) keep peft's own low-rank forward, so dense runs pay nothing.
    """
    import types

    from peft.tuners.lora import Linear as LoraLinear

    n = 0
    for name, mod in unwrap(peft_model).named_modules():
        if isinstance(mod, LoraLinear):
            object.__setattr__(mod, "_pt_mask_name", name)
            object.__setattr__(mod, "_pt_masks", masks)
            mod.forward = types.MethodType(_masked_lora_forward, mod)
            n += 1
    return n


def _masked_lora_forward(self, x, *args, **kwargs):
    import torch.nn.functional as F

    mask = self._pt_masks.masks.get(self._pt_mask_name)
    if mask is None or self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    for ad in self.active_adapters:
        if ad not in self.lora_A:
            continue
        a, b = self.lora_A[ad].weight, self.lora_B[ad].weight
        delta = (b @ a) * self.scaling[ad]
        delta = delta * mask.to(device=delta.device, dtype=delta.dtype)
        result = result + F.linear(self.lora_dropout[ad](x).to(a.dtype), delta).to(result.dtype)
    return result
