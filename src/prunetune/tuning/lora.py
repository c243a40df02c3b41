"""LoRA / rsLoRA through peft, with targets taken from the architecture adapter.

Targets are the *exact* module names of the prunable linears (by role), so LoRA sits on precisely the
layers that pruning masks, for every family, and no regex per model has to be maintained. A new task head
(classifier / score) is trained in full (`modules_to_save`), since it starts random.
"""

from __future__ import annotations

import torch
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


def lora_config(model: nn.Module, task: str, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
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
    """Make LoRA layers train exactly the weight that will be exported: (W + s·BA) ⊙ M.

    Plain LoRA adds the dense update s·BA, so the merged-and-masked export (W + s·BA) ⊙ M would differ from
    the model that was trained and evaluated. Masking the update in the forward pass closes that gap: the
    predictions before and after the merge are the same. Layers without a mask (yet: PAYT adds masks as it
    goes, the lookup is live) keep peft's own low-rank forward, so dense runs pay nothing.

    Two paths, both exact at evaluation (dropout is off there):
    - LoRA dropout 0 (the default): one product with the merged weight, y = x·((W + s·BA) ⊙ M)ᵀ + b. It costs
      one extra full-size product in backward (the gradient of the merged weight, from which those of A and
      B follow) instead of peft's low-rank path; the merged weight is rebuilt in backward, not stored.
    - LoRA dropout > 0: the update sees a dropped-out copy of x, so it is a second product,
      y = W·x + ((s·BA) ⊙ M)·dropout(x), with the same recompute-in-backward economy.
    Measured on 50%-pruned SmolLM2 (BENCHMARKS.md): 1.19x a plain peft step's CPU time at dropout 0, 1.71x at
    0.1, at no more peak memory than peft's.
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


class MaskedLoraLinear(torch.autograd.Function):
    """y = x·((W + s·B·A) ⊙ M)ᵀ + bias, or with `weight` None only the masked update y = x·((s·B·A) ⊙ M)ᵀ.

    Autograd through the plain expression would keep the full-size merged weight of every layer alive until
    backward (as much memory as the model's linears again); this keeps x, A, B and the bool mask only and
    rebuilds the merged weight in backward, so the step's peak memory stays at plain LoRA's.

    Every weight-sized pass counts here: the merged weight is one `addmm` (W + s·B·A in a single write) and
    one in-place multiply by the bool mask. `masked_fill_(~mask, 0)` gives the same values but allocates the
    inverted mask and runs about 6x slower on CPU (7 ms against 1.2 ms for a 1536 x 576 layer, about a
    sixth of that layer's matrix product), three times a step. The scale s is applied to the rank-r factors
    and products, never to a full-size tensor.
    """

    @staticmethod
    def _merged(weight, a, b, mask, scale):
        b = b.to(a.dtype)
        if weight is None:
            w = torch.mm(b * scale, a)
        else:
            w = torch.addmm(weight, b.to(weight.dtype), a.to(weight.dtype), alpha=scale)
        return w.mul_(mask)

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, mask, scale):
        w = MaskedLoraLinear._merged(weight, a, b, mask, scale)
        ctx.save_for_backward(x, weight, a, b, mask)
        ctx.scale = scale
        return torch.nn.functional.linear(x.to(w.dtype), w, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight, a, b, mask = ctx.saved_tensors
        s = ctx.scale
        gy2 = gy.reshape(-1, gy.shape[-1])
        gx = g_weight = g_bias = ga = gb = None
        if ctx.needs_input_grad[0]:
            w = MaskedLoraLinear._merged(weight, a, b, mask, s)
            gx = (gy2.to(w.dtype) @ w).view(*gy.shape[:-1], w.shape[1]).to(x.dtype)
            del w
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            gw = torch.mm(gy2.t(), x.reshape(-1, x.shape[-1]).to(gy2.dtype)).mul_(mask)  # grad of the merged weight
            if ctx.needs_input_grad[1]:
                g_weight = gw.to(weight.dtype)
            g = gw.to(a.dtype)
            if ctx.needs_input_grad[4]:
                gb = (g @ a.t()).mul_(s)  # d/dB of s·(BA ⊙ M): s·(G ⊙ M)·Aᵀ
            if ctx.needs_input_grad[3]:
                ga = (b.t() @ g).mul_(s)
        if ctx.needs_input_grad[2]:
            g_bias = gy2.sum(0)
        return gx, g_weight, g_bias, ga, gb, None, None


def takes_exact_path(layer: nn.Module) -> bool:
    """Whether a masked LoRA layer trains through the one-product path F.linear(x, (W + s·B·A) ⊙ M).

    That needs one active adapter without dropout (peft puts an `nn.Identity` there at `lora_dropout=0`):
    with dropout the update sees another input than W does and cannot be merged into one product.
    """
    active = [ad for ad in layer.active_adapters if ad in layer.lora_A]
    return len(active) == 1 and isinstance(layer.lora_dropout[active[0]], nn.Identity)


def _masked_lora_forward(self, x, *args, **kwargs):
    mask = self._pt_masks.masks.get(self._pt_mask_name)
    if (mask is None or self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None
            or any(ad in self.lora_variant for ad in self.active_adapters)):
        return type(self).forward(self, x, *args, **kwargs)
    active = [ad for ad in self.active_adapters if ad in self.lora_A]
    base = self.base_layer
    if mask.device != base.weight.device:
        mask = mask.to(base.weight.device)
    if takes_exact_path(self) and not args and not kwargs:
        ad = active[0]  # the exact one-weight path
        y = MaskedLoraLinear.apply(x, base.weight, base.bias, self.lora_A[ad].weight, self.lora_B[ad].weight,
                                   mask, float(self.scaling[ad]))
        return y.to(x.dtype)
    result = base(x, *args, **kwargs)
    for ad in active:
        a, b = self.lora_A[ad].weight, self.lora_B[ad].weight
        dx = self.lora_dropout[ad](x).to(a.dtype)
        result = result + MaskedLoraLinear.apply(dx, None, None, a, b, mask, float(self.scaling[ad])).to(result.dtype)
    return result
