"""The factorised LoSparse format on disk and its inference layer (W = U·V + S with S stored compactly).

It lives with the models, not with the method, because loading it is a models concern:
`prunetune.load_model(dir)` (models/loading.py) recognises the `losparse.json` marker and calls
`load_factorized`, and no lower layer may import `methods/`. The method (`methods/losparse/`) trains
`LowRankSparseLinear` layers and writes this format with `write_factorized`.

A directory holds:

    config.json, tokenizer files      as in any HF dir (the config names the task head's class)
    model.safetensors                 every weight except the factorised layers'
    losparse.safetensors              per layer: U, V, bias, and the kept part of S
                                        cols: `index` (kept input columns) + `values` (out × k)
                                        rows: `index` (kept output rows)   + `values` (k × in)
                                        csr:  `crow`, `col`, `values` (unstructured)
    losparse.json                     marker: format, version, task, per-layer kind/rank/shape, counts

Loading:  `model = prunetune.load_model("DIR").model` (the class in config.json's `architectures`, so the
trained task head comes back whatever task is asked for).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.models.card import write_model_card
from prunetune.models.export import atomic_dir, strip_quantization_config

MARKER = "losparse.json"
FACTORIZED_FILE = "losparse.safetensors"
FORMAT_VERSION = 1


class FactorizedLinear(nn.Module):
    """The inference form of a finished LoSparse layer: U, V and only the kept part of S.

    kind "cols": S restricted to kept input columns `index`  -> y += x[..., index]·S_cᵀ
    kind "rows": S restricted to kept output rows `index`    -> y[..., index] += x·S_rᵀ
    kind "csr":  unstructured S as a CSR sparse matrix       -> y += (S·xᵀ)ᵀ
    kind "none": nothing of S kept.
    """

    def __init__(self, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None, kind: str,
                 values: torch.Tensor | None = None, index: torch.Tensor | None = None,
                 csr: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.out_features, self.rank = U.shape
        self.in_features = V.shape[1]
        self.kind = kind
        self.U, self.V = nn.Parameter(U, requires_grad=False), nn.Parameter(V, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.values = nn.Parameter(values, requires_grad=False) if values is not None else None
        self.register_buffer("index", index)
        self.csr = None
        if kind == "csr" and csr is not None:
            crow, col, val = csr
            with warnings.catch_warnings():  # torch's "invariant checks disabled" notice, once per layer
                warnings.simplefilter("ignore", UserWarning)
                self.csr = torch.sparse_csr_tensor(crow, col, val, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(F.linear(x, self.V), self.U, self.bias)
        if self.kind == "cols":
            y = y + F.linear(x.index_select(-1, self.index), self.values)
        elif self.kind == "rows":
            y = y.index_add(-1, self.index, F.linear(x, self.values))
        elif self.kind == "csr":
            flat = x.reshape(-1, self.in_features)
            y = y + (self.csr @ flat.T).T.reshape(*x.shape[:-1], self.out_features)
        return y

    def kept_parameters(self) -> int:
        """Numbers stored for this layer: U, V, bias and the kept values of S (indices not counted)."""
        n = self.U.numel() + self.V.numel() + (self.bias.numel() if self.bias is not None else 0)
        if self.values is not None:
            n += self.values.numel()
        if self.csr is not None:
            n += int(self.csr.values().numel())
        return n

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        w = self.U @ self.V
        if self.kind == "cols":
            w[:, self.index] += self.values
        elif self.kind == "rows":
            w[self.index] += self.values
        elif self.kind == "csr":
            w += self.csr.to_dense()
        return w


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: drop entries that alias an earlier one (tied embeddings are
    re-tied from the config at load)."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.data_ptr()
        if ptr in seen and v.numel():
            continue
        seen.add(ptr)
        out[k] = v
    return out


def is_factorized_dir(path: Path | str) -> bool:
    return (Path(os.path.expanduser(str(path))) / MARKER).is_file()


@torch.no_grad()
def write_factorized(root: nn.Module, tokenizer: Any, out: Path | str, layers: dict[str, dict[str, torch.Tensor]],
                     desc: dict[str, dict], marker_extra: dict | None = None, manifest: dict | None = None,
                     card: dict | None = None) -> Path:
    """Write the format above atomically. `layers[name]` holds that layer's tensors (U, V, bias?, index?,
    values?, crow?, col?), `desc[name]` its kind/rank/shape; every other weight of `root` goes to
    model.safetensors."""
    from safetensors.torch import save_file

    tensors = {f"{n}.{k}": v.detach().contiguous() for n, d in layers.items() for k, v in d.items()}
    prefixes = tuple(f"{n}." for n in layers)
    rest = _untie({k: v.detach().contiguous() for k, v in root.state_dict().items() if not k.startswith(prefixes)})
    with atomic_dir(out, manifest) as tmp:
        strip_quantization_config(root)
        root.config.architectures = [type(root).__name__]  # what save_pretrained records; the loader reads it
        root.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(rest, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_file(tensors, str(tmp / FACTORIZED_FILE), metadata={"format": "pt"})
        marker = {"format": "prunetune-losparse", "version": FORMAT_VERSION, "layers": desc,
                  "loader": "prunetune.load_model(dir) rebuilds FactorizedLinear layers", **(marker_extra or {})}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, default=str))

        write_model_card(tmp, manifest, {"method": "losparse", "tags": ["low-rank", "factorized"],
                                         **(card or {})}, root.config)
    return Path(out)


def read_marker(path: Path) -> dict:
    try:
        marker = json.loads((path / MARKER).read_text())
        if marker.get("format") != "prunetune-losparse":
            raise ValueError
    except (OSError, ValueError, AttributeError):
        raise PrunetuneError(f"{path / MARKER} is not a readable LoSparse marker") from None
    if int(marker.get("version", 0)) > FORMAT_VERSION:
        raise PrunetuneError(f"{path} was written by a newer prunetune (LoSparse format {marker['version']})")
    return marker


@torch.no_grad()
def load_factorized(path: Path | str, task: str | None = None, dtype: torch.dtype = torch.float32):
    """Rebuild a factorised directory: the HF model class its config names (so the trained task head comes
    back whatever `task` the caller asked for), each factorised layer as a `FactorizedLinear`.
    Returns (model, tokenizer)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    import transformers

    path = Path(os.path.expanduser(str(path)))
    marker = read_marker(path)
    try:
        config = AutoConfig.from_pretrained(path)
        fac = load_file(str(path / FACTORIZED_FILE))
        rest = load_file(str(path / "model.safetensors"))
    except Exception as exc:
        raise PrunetuneError(f"cannot read the LoSparse export in {path}: {type(exc).__name__}: {exc}") from None
    # the class the model was saved from (config.json's architectures): its task head comes back as trained
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise PrunetuneError(f"{path}/config.json names no transformers model class (architectures: {archs})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(config).to(dtype)
    for name, d in marker["layers"].items():
        def g(k: str, name: str = name) -> torch.Tensor | None:
            return fac.get(f"{name}.{k}")

        vals = g("values")
        layer = FactorizedLinear(g("U").to(dtype), g("V").to(dtype), g("bias").to(dtype) if d.get("bias") else None,
                                 d["kind"], values=vals.to(dtype) if d["kind"] in ("cols", "rows") else None,
                                 index=g("index"),
                                 csr=(g("crow"), g("col"), vals.to(dtype)) if d["kind"] == "csr" else None)
        set_module(model, name, layer)
    missing, unexpected = model.load_state_dict(rest, strict=False)
    prefixes = tuple(f"{n}." for n in marker["layers"])
    missing = [k for k in missing if not k.startswith(prefixes)]
    if unexpected:
        raise PrunetuneError(f"{path}: weights {unexpected[:3]} do not belong to a {config.model_type} model")
    if missing:  # only tied weights (lm_head <-> embeddings) may be absent: re-tie, then they must alias
        model.tie_weights()
        sd = model.state_dict(keep_vars=True)
        loaded = {sd[k].data_ptr() for k in rest if k in sd}
        untied = [k for k in missing if sd[k].data_ptr() not in loaded]
        if untied:
            raise PrunetuneError(f"{path}: weights missing from model.safetensors: {untied[:3]}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception:
        tokenizer = None
    model.eval()
    return model, tokenizer
