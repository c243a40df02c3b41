"""Structured pruning that shrinks the model: coupled structures, their scores, uniform widths, surgery.

* `couplings`: what a structure is (a GQA KV group with its query heads and o_proj columns; an MLP neuron across
  gate/up/down; a hidden channel across embeddings, norms, every projection and the LM head) and the masks of
  `prune`'s structured granularities;
* `scores`: how much each structure matters, from the criterion registry's structure scores;
* `widths`: how many of each every layer keeps (uniform: transformers has no per-layer widths), and which;
* `surgery`: zero them (`mask_structures`) or remove them physically (`shrink`) so that stock
  `from_pretrained` loads the result; FLAP's bias compensation.

The lifecycle (VIB gates or a baseline, then surgery) is `methods.shrink.prune_structured`. This package's
`__init__` imports nothing: import the module you need.
"""
