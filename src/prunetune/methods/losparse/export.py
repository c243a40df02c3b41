"""LoSparse's factorised export: U, V, the bias and only the kept part of S (format in `models/factorized.py`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.methods.losparse.layers import losparse_layers, parameter_counts
from prunetune.methods.losparse.spec import LosparseSpec
from prunetune.models.arch import unwrap
from prunetune.models.factorized import write_factorized


@torch.no_grad()
def save_factorized(model: nn.Module, tokenizer: Any, out: Path | str, spec: LosparseSpec | None = None,
                    task: str = "seq-cls", manifest: dict | None = None) -> Path:
    """The factorised export (format in `models/factorized.py`): U, V, bias and only the kept part of S.

    Structured S is stored as its kept columns or rows (whichever is smaller) with their indices, so the
    forward pass multiplies by a narrow dense block; unstructured S is stored as CSR. Load it with
    `prunetune.load_model(dir)`.
    """
    root = unwrap(model)
    layers = losparse_layers(root)
    if not layers:
        raise PrunetuneError("save_factorized: the model holds no LoSparse layers")
    structured = spec.pooling if spec is not None else None
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    desc: dict[str, dict] = {}
    for name, mod in layers.items():
        S = mod.weight.detach()
        nz = S != 0
        rows, cols = nz.any(1), nz.any(0)
        t = {"U": mod.U, "V": mod.V}
        if mod.bias is not None:
            t["bias"] = mod.bias
        n_rows, n_cols = int(rows.sum()), int(cols.sum())
        if int(nz.sum()) == 0:
            kind = "none"
        elif structured is not None and n_cols * S.shape[0] <= n_rows * S.shape[1]:
            kind = "cols"
            t["index"] = torch.nonzero(cols).flatten()
            t["values"] = S[:, t["index"]]
        elif structured is not None:
            kind = "rows"
            t["index"] = torch.nonzero(rows).flatten()
            t["values"] = S[t["index"]]
        else:
            kind = "csr"
            with warnings.catch_warnings():  # "CSR support is in beta": the format is only stored here
                warnings.simplefilter("ignore", UserWarning)
                csr = S.to_sparse_csr()
            t.update(crow=csr.crow_indices(), col=csr.col_indices(), values=csr.values())
        tensors[name] = t
        desc[name] = {"kind": kind, "rank": mod.rank, "shape": [mod.out_features, mod.in_features],
                      "bias": mod.bias is not None, "kept": int(nz.sum())}
    extra = {"task": task, "architectures": getattr(root.config, "architectures", None),
             "spec": spec.to_dict() if spec is not None else None, "parameters": parameter_counts(root)}
    return write_factorized(root, tokenizer, out, tensors, desc, extra, manifest)
