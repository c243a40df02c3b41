"""Composable pruning: fine-tune every pruned module once, then compose many pruned configurations from them.

Someone who needs several pruned versions of one model (different attention and linear pruning rates) would
otherwise recover each version from scratch. Modules shared between versions are pruned and fine-tuned once,
at module level, and composed into every version; each version then starts its model-level fine-tuning from a
better point and needs fewer steps. The flow:

    configurations  [(attention rate, linear rate), ...]   global, or one rate per block
      -> plan():    unique units (block, module, criterion, rate); rate 0 means "left dense", no unit
      -> train_units(): per block, ONE capture of the original model's activations on the training text
                    (forward hooks), then every missing unit of that block is pruned and fine-tuned to
                    reproduce the original module's output on the original module's inputs (MSE);
                    results go to a safetensors cache keyed by everything they depend on
      -> compose(): each configuration's model = the original with every pruned module swapped in,
                    plus the MaskSet that keeps pruned weights at zero during model-level fine-tuning

The modules (units) of a block, by default (the seed's choice):

* ``attention`` — q, k, v pruned by whole heads (head-wise L1; a GQA KV group with its query heads is one
  unit, `pruning.shrink.couplings.couplings`) at the attention rate. Kept rows of q/k/v reproduce their own
  outputs exactly, so a module made of q/k/v alone could learn nothing: the unit is the attention sublayer
  (softmax and the *original, frozen* o-projection included, found as the smallest module holding q and o)
  and q/k/v learn to make up for the removed heads in the sublayer's output.
* ``o``, ``gate``, ``up``, ``down`` — each linear pruned unstructured (L1 by default) at the linear rate and
  fine-tuned alone against the original layer's output. Its MSE over all captured tokens is the quadratic
  ``tr(ΔŴ H ΔŴᵀ) / (n·d_out)`` with ``H = Σ x̃ x̃ᵀ`` (x̃ = [x, 1] for the bias): the capture accumulates H
  (small, shared by every linear that reads the same input and by every rate), and each Adam step costs one
  ``d_out × d_in²`` product instead of a pass over all tokens. The steps are exact full-batch gradient steps.

T5 decoders add ``cross-attention`` (cq/ck/cv) and ``co``. Units are trained independently against the
original model; their small disagreements after composition are what the short model-level fine-tuning fixes.
"""

from __future__ import annotations

from types import ModuleType

from prunetune.lazy import lazy_exports

from prunetune.methods.composable.plan import (  # noqa: F401  the method's public names
    ATTENTION_UNITS,
    LINEAR_ROLES,
    ALL_UNITS,
    DEFAULT_ATTENTION_UNITS,
    DEFAULT_LINEAR_UNITS,
    parse_rate,
    Rate,
    Configuration,
    parse_configurations,
    Unit,
    Plan,
    check_units,
    check_linear_criterion,
    check_head_criterion,
    linear_criterion_needs_activations,
    plan,
)
from prunetune.methods.composable.spec import ComposeSpec  # noqa: F401  the method's settings (recipe `compose`)
from prunetune.methods.composable.cache import (  # noqa: F401  the method's public names
    CACHE_FORMAT,
    module_ft_settings,
    tensor_hash,
    model_hash,
    data_hash,
    default_cache_dir,
    ModuleCache,
)
from prunetune.methods.composable.capture import (  # noqa: F401  the method's public names
    attention_container,
    BlockCapture,
    capture_blocks,
)
from prunetune.methods.composable.units import (  # noqa: F401  the method's public names
    linear_mse,
    train_linear_unit,
    head_masks,
    train_attention_unit,
    UnitResults,
    train_units,
)
from prunetune.methods.composable.compose import (  # noqa: F401  the method's public names
    compose,
    ComposedStart,
    text_batches,
    geometric_checks,
    save_composed,
)

#: the training side's public names, imported on first use (`prunetune.lazy`): the recipe schema imports `spec`,
#: and `prune` must not load transformers' Trainer, peft and datasets. Only `run` is deferred (`plan` and
#: `compose` are also submodules' names, which a deferred name must not be).
_LAZY = {name: "run" for name in ("ValidationClock", "run_composable", "run_composable_seq2seq")}
__all__ = [n for n, v in dict(globals()).items() if not n.startswith("_") and not isinstance(v, ModuleType)
           and n not in ("annotations", "lazy_exports", "ModuleType")] + sorted(_LAZY)
__getattr__ = lazy_exports(__name__, _LAZY, globals())
