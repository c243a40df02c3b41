"""Architecture adapters: the only place that knows how a model family names its modules.

Methods ask an adapter for blocks, prunable linear layers by role, attention geometry and MLP width; no
method indexes `model.model.layers` itself. Adding a family is one subclass here plus its tiny test model.

Roles are uniform across families so that criteria and structured pruning can reason about them:
`q k v o` (attention projections), `gate up` (MLP inputs; BERT/T5 `ffn_in` maps to `up`), `down` (MLP output).
T5 decoder cross-attention uses `cq ck cv co`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from prunetune.errors import PrunetuneError

ATTN_IN_ROLES = ("q", "k", "v", "cq", "ck", "cv")
ATTN_OUT_ROLES = ("o", "co")
MLP_IN_ROLES = ("gate", "up")
MLP_OUT_ROLES = ("down",)


@dataclass(frozen=True)
class AttentionGeometry:
    """Shapes that structured pruning must respect. With GQA, `kv_groups` query heads share one KV head."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class Block:
    """One transformer block: its module, a stable name, and its prunable linears keyed by role."""

    index: int
    name: str
    module: nn.Module
    linears: dict[str, nn.Linear] = field(default_factory=dict)  # role -> layer
    stack: str = "decoder"  # "encoder" | "decoder"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model under a peft wrapper (module names then match the saved checkpoint).

    The wrapper is recognised by its class or a base class (FSDP2 swaps in a subclass, `FSDPPeftModel...`)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and any(c.__name__.startswith("Peft") for c in type(model).__mro__):
        return get_base()
    return model


def base_linear(module: nn.Module) -> nn.Linear:
    """The frozen base `nn.Linear` behind a peft LoRA layer (or the layer itself)."""
    inner = getattr(module, "base_layer", None)
    return inner if isinstance(inner, nn.Linear) else module  # type: ignore[return-value]


class ArchAdapter:
    family: str = ""
    model_types: tuple[str, ...] = ()
    # Structures `structured.shrink` can remove physically so that stock transformers still loads the model:
    # each needs a config field that sets its width uniformly for every layer (see `set_width`).
    shrinkable: tuple[str, ...] = ()
    # What normalises the residual stream: "rms" (RMSNorm, hidden channels can go) or "layer" (LayerNorm).
    norm_kind: str = "layer"

    def __init__(self, model: nn.Module) -> None:
        self.root = unwrap(model)
        self.config = self.root.config
        self._names = {id(m): n for n, m in self.root.named_modules()}

    # -- to implement per family -------------------------------------------------------------------
    def _block_modules(self) -> list[tuple[str, nn.Module]]:  # (stack, module)
        raise NotImplementedError

    def _block_linears(self, block: nn.Module, stack: str) -> dict[str, nn.Module]:
        raise NotImplementedError

    def attention(self) -> AttentionGeometry:
        raise NotImplementedError

    def mlp_width(self) -> int:
        raise NotImplementedError

    def set_width(self, kind: str, kept: int) -> None:
        """Write a shrunk uniform width into the config (`kept` KV groups for heads, else channels)."""
        raise PrunetuneError(f"{self.family} models cannot shrink '{kind}' and still load in stock transformers")

    def hidden_norms(self) -> list[nn.Module]:
        """Every norm over the residual stream (per block and final); only RMSNorm families define it."""
        raise PrunetuneError(
            f"hidden-dimension pruning needs an RMSNorm family; {self.config.model_type} normalises with "
            f"LayerNorm, whose mean and variance over the channels change when channels go")

    def output_heads(self) -> list[nn.Linear]:
        """Linear heads reading the final hidden state (LM head, classifier `score`)."""
        hidden = self.attention().hidden_size
        out = []
        for name in ("lm_head", "score", "classifier"):
            mod = getattr(self.root, name, None)
            if isinstance(mod, nn.Linear) and mod.in_features == hidden:
                out.append(mod)
        return out

    # -- shared ------------------------------------------------------------------------------------
    def name_of(self, module: nn.Module) -> str:
        return self._names[id(module)]

    def blocks(self) -> list[Block]:
        out = []
        for i, (stack, mod) in enumerate(self._block_modules()):
            lin = {r: base_linear(m) for r, m in self._block_linears(mod, stack).items() if m is not None}
            out.append(Block(i, self.name_of(mod), mod, lin, stack))
        return out

    def linears(self) -> dict[str, tuple[str, nn.Linear]]:
        """All prunable linears: module name -> (role, layer). Embeddings, LM and task heads are excluded."""
        out: dict[str, tuple[str, nn.Linear]] = {}
        for b in self.blocks():
            for role, lin in b.linears.items():
                out[self.name_of(lin)] = (role, lin)
        return out

    def backbone(self) -> nn.Module:
        return self.root.base_model

    def num_blocks(self) -> int:
        return len(self._block_modules())

    def describe(self) -> dict:
        g = self.attention()
        return {
            "family": self.family,
            "model_type": self.config.model_type,
            "blocks": self.num_blocks(),
            "hidden_size": g.hidden_size,
            "heads": g.num_heads,
            "kv_heads": g.num_kv_heads,
            "head_dim": g.head_dim,
            "mlp_width": self.mlp_width(),
            # widths before -> after `structured.shrink` (KV groups for heads), when the model was shrunk
            "shrunk": dict(getattr(self.config, "prunetune_shrink", None) or {}),
        }


class LlamaAdapter(ArchAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    shrinkable = ("heads", "neurons", "hidden")
    norm_kind = "rms"

    def _block_modules(self):
        return [("decoder", m) for m in self.backbone().layers]

    def _block_linears(self, block, stack):
        a, m = block.self_attn, block.mlp
        return {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj,
                "gate": m.gate_proj, "up": m.up_proj, "down": m.down_proj}

    def attention(self) -> AttentionGeometry:
        c = self.config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return AttentionGeometry(heads, getattr(c, "num_key_value_heads", None) or heads, head_dim, c.hidden_size)

    def mlp_width(self) -> int:
        return self.config.intermediate_size

    def set_width(self, kind: str, kept: int) -> None:
        c, g = self.config, self.attention()
        if kind == "heads":  # head_dim is written explicitly: hidden_size // heads would no longer give it
            c.head_dim, c.num_key_value_heads, c.num_attention_heads = g.head_dim, kept, kept * g.kv_groups
        elif kind == "neurons":
            c.intermediate_size = kept
        elif kind == "hidden":
            c.head_dim, c.hidden_size = g.head_dim, kept
        else:
            super().set_width(kind, kept)

    def hidden_norms(self) -> list[nn.Module]:
        bb = self.backbone()
        return [n for layer in bb.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)] + [bb.norm]


class BertAdapter(ArchAdapter):
    family = "bert"
    model_types = ("bert", "roberta", "xlm-roberta")
    # Heads cannot shrink: BERT derives the head size as hidden_size / num_attention_heads (no head_dim field).
    shrinkable = ("neurons",)

    def _block_modules(self):
        return [("encoder", m) for m in self.backbone().encoder.layer]

    def _block_linears(self, block, stack):
        s = block.attention.self
        return {"q": s.query, "k": s.key, "v": s.value, "o": block.attention.output.dense,
                "up": block.intermediate.dense, "down": block.output.dense}

    def attention(self) -> AttentionGeometry:
        c = self.config
        return AttentionGeometry(c.num_attention_heads, c.num_attention_heads,
                                 c.hidden_size // c.num_attention_heads, c.hidden_size)

    def mlp_width(self) -> int:
        return self.config.intermediate_size

    def set_width(self, kind: str, kept: int) -> None:
        if kind != "neurons":
            super().set_width(kind, kept)
        self.config.intermediate_size = kept


class DistilBertAdapter(BertAdapter):
    """DistilBERT: BERT's geometry under other names (`q_lin k_lin v_lin out_lin`, `ffn.lin1 ffn.lin2`)."""

    family = "bert"
    model_types = ("distilbert",)

    def _block_modules(self):
        return [("encoder", m) for m in self.backbone().transformer.layer]

    def _block_linears(self, block, stack):
        a = block.attention
        return {"q": a.q_lin, "k": a.k_lin, "v": a.v_lin, "o": a.out_lin, "up": block.ffn.lin1,
                "down": block.ffn.lin2}

    def attention(self) -> AttentionGeometry:
        c = self.config
        return AttentionGeometry(c.n_heads, c.n_heads, c.dim // c.n_heads, c.dim)

    def mlp_width(self) -> int:
        return self.config.hidden_dim

    def set_width(self, kind: str, kept: int) -> None:
        if kind != "neurons":
            ArchAdapter.set_width(self, kind, kept)
        self.config.hidden_dim = kept


class T5Adapter(ArchAdapter):
    family = "t5"
    model_types = ("t5", "mt5")
    shrinkable = ("neurons",)  # d_ff is one width for both stacks; heads would need relative-bias surgery

    def backbone(self) -> nn.Module:
        return self.root

    def _block_modules(self):
        enc = [("encoder", b) for b in self.root.encoder.block]
        dec = [("decoder", b) for b in self.root.decoder.block] if hasattr(self.root, "decoder") else []
        return enc + dec

    def _block_linears(self, block, stack):
        sa = block.layer[0].SelfAttention
        out: dict[str, nn.Module] = {"q": sa.q, "k": sa.k, "v": sa.v, "o": sa.o}
        if stack == "decoder":
            ca = block.layer[1].EncDecAttention
            out.update({"cq": ca.q, "ck": ca.k, "cv": ca.v, "co": ca.o})
        ff = block.layer[-1].DenseReluDense
        if hasattr(ff, "wi_0"):
            out.update({"gate": ff.wi_0, "up": ff.wi_1})
        else:
            out["up"] = ff.wi
        out["down"] = ff.wo
        return out

    def attention(self) -> AttentionGeometry:
        c = self.config
        return AttentionGeometry(c.num_heads, c.num_heads, c.d_kv, c.d_model)

    def mlp_width(self) -> int:
        return self.config.d_ff

    def set_width(self, kind: str, kept: int) -> None:
        if kind != "neurons":
            super().set_width(kind, kept)
        self.config.d_ff = kept


ADAPTERS: list[type[ArchAdapter]] = [LlamaAdapter, BertAdapter, DistilBertAdapter, T5Adapter]


def register_adapter(cls: type[ArchAdapter]) -> type[ArchAdapter]:
    """Class decorator: add a model family (CONTRIBUTING.md); a model type claimed twice is a bug, refused."""
    claimed = {t for c in ADAPTERS for t in c.model_types}
    if not cls.family or not cls.model_types or claimed & set(cls.model_types):
        raise ValueError(f"adapter {cls.__name__}: needs a family and model types no other adapter claims")
    ADAPTERS.append(cls)
    return cls


def get_adapter(model: nn.Module) -> ArchAdapter:
    """The adapter for `model` (peft-wrapped or not); unsupported families get a clear error."""
    root = unwrap(model)
    model_type = getattr(getattr(root, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    supported = ", ".join(t for c in ADAPTERS for t in c.model_types)
    raise PrunetuneError(f"model type '{model_type}' is not supported; supported families: {supported}")


def parameter_count(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@torch.no_grad()
def nonzero_count(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += int(torch.count_nonzero(p))
    return total
