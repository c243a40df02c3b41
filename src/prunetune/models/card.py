"""The Hugging Face model card (`README.md`) written into every exported model directory.

Why: an exported directory should be pushable to a model hub as it is, and a reader who finds it later
should learn from the directory alone what it is: which model it came from (`base_model`), how it was
pruned (method, real-zero sparsity, pattern), and every number measured on it with the protocol that
produced it. The card is built with `huggingface_hub`'s own card classes (`ModelCardData` renders the YAML
metadata hub tooling reads, `ModelCard` the file), so `ModelCard.load` parses what we write.

The card is derived from the manifest the directory is saved with (metrics with their `protocol`) plus an
optional `card` dict from the caller, who knows the recipe::

    {"base_model": "smollm2-135m" | hub id | local path, "method": "wanda", "sparsity": 0.5,
     "pattern": "2:4", "structured": False, "tags": [...], "details": {...}}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CARD_FILE = "README.md"
LIBRARY = "transformers"  # what loads the directory: plain transformers, no prunetune needed

#: the public hub id of each packaged alias (the tiny random models have none)
ALIAS_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
                 "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}

_PIPELINES = (("ForCausalLM", "text-generation"), ("ForSequenceClassification", "text-classification"),
              ("ForMaskedLM", "fill-mask"), ("ForConditionalGeneration", "text2text-generation"),
              ("ForSeq2SeqLM", "text2text-generation"))


def hub_base_model(spec: str | None) -> str | None:
    """The hub id a model spec stands for, when it has one.

    Aliases map to their public ids; a local directory that carries its own card passes its `base_model` on
    (a model pruned, then fine-tuned, names the original); a path without one, or a random tiny model, has
    none (None: the card then names the spec in its text only). Anything else is taken as a hub id.
    """
    if not spec:
        return None
    if spec in ALIAS_HUB_IDS:
        return ALIAS_HUB_IDS[spec]
    if spec.startswith("tiny-") or spec.startswith("tiny:"):
        return None
    path = Path(os.path.expanduser(spec))
    if path.exists() or spec.startswith((".", "/", "~")):
        for d in (path, path / "model"):  # a run directory exports its model into run/model
            if (d / CARD_FILE).is_file():
                try:
                    from huggingface_hub import ModelCard

                    base = ModelCard.load(d / CARD_FILE).data.to_dict().get("base_model")
                except Exception:  # an unparsable card is no reason to fail an export
                    base = None
                return base if isinstance(base, str) else None
        return None
    return spec if spec.count("/") == 1 else None


def pipeline_tag(config: Any) -> str | None:
    """The hub's pipeline tag for the architecture saved in `config` (None when unknown)."""
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        for suffix, tag in _PIPELINES:
            if str(arch).endswith(suffix):
                return tag
    return "feature-extraction" if archs else None


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (int, str)):
        return str(value)
    return json.dumps(value, default=str, separators=(",", ":"))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def metric_rows(metrics: dict, prefix: str = "") -> list[tuple[str, str, str]]:
    """(name, value, protocol) for every metric in a manifest's `metrics`, nested by stage or not.

    A metric is a dict with a `value` (its `protocol` beside it) or a bare number at the top level.
    """
    rows: list[tuple[str, str, str]] = []
    for key, m in (metrics or {}).items():
        name = f"{prefix}{key}"
        if isinstance(m, dict) and "value" in m:
            if isinstance(m["value"], (int, float)) or m["value"] is None:
                proto = m.get("protocol")
                text = "; ".join(f"{k}={_fmt(v)}" for k, v in proto.items()) if isinstance(proto, dict) else (
                    "" if proto is None else _fmt(proto))
                rows.append((name, _fmt(m["value"]), text))
        elif isinstance(m, dict) and any(isinstance(v, dict) and "value" in v for v in m.values()):
            rows += metric_rows(m, f"{name}/")
        elif isinstance(m, (int, float)) and not isinstance(m, bool) and not prefix:
            rows.append((name, _fmt(m), ""))
    return rows


def sparsity_from_metrics(metrics: dict) -> float | None:
    """The last real-zero `sparsity` a manifest reports (stages in order: the last is the exported model's)."""
    found = None
    for key, m in (metrics or {}).items():
        if key == "sparsity":
            v = m.get("value") if isinstance(m, dict) else m
            if isinstance(v, (int, float)):
                found = float(v)
        elif isinstance(m, dict):
            inner = sparsity_from_metrics(m)
            found = inner if inner is not None else found
    return found


def build_model_card(manifest: dict | None, card: dict | None = None, config: Any = None):
    """A `huggingface_hub.ModelCard` for a directory saved with `manifest` (see the module docstring)."""
    from huggingface_hub import ModelCard, ModelCardData

    manifest = manifest or {}
    card = dict(card or {})
    metrics = manifest.get("metrics") or {}
    spec = card.get("base_model")
    base = hub_base_model(spec) if spec else None
    sparsity = card.get("sparsity")
    if sparsity is None:
        sparsity = sparsity_from_metrics(metrics)
    method = card.get("method")
    tags = ["prunetune"]
    if method:
        tags.append("pruned")
    if sparsity:
        tags.append("sparse")
    if card.get("structured"):
        tags.append("structured")
    if card.get("pattern"):
        tags += ["semi-structured", f"{card['pattern']}-sparsity"]
    for t in [*(str(method).split("+") if method else []), *card.get("tags", [])]:
        if t and t not in tags:
            tags.append(t)
    details = {k: v for k, v in {"method": method, "sparsity": sparsity, "pattern": card.get("pattern"),
                                 "source": spec, "kind": manifest.get("kind"),
                                 **(card.get("details") or {})}.items() if v is not None}
    data = ModelCardData(base_model=base, library_name=LIBRARY, tags=tags, pipeline_tag=pipeline_tag(config),
                         pruning_method=method, sparsity=None if sparsity is None else round(float(sparsity), 6),
                         prunetune=json.loads(json.dumps(details, default=str)))
    rows = metric_rows(metrics)
    lines = [f"# {card.get('title') or 'Pruned model'}", "",
             "Made with prunetune"
             + (f" from `{spec}`" + (f" ([{base}](https://huggingface.co/{base}))" if base and base != spec else "")
                if spec else "") + ".",
             ""]
    if method:
        lines.append(f"- method: {method}" + (f" ({card['pattern']})" if card.get("pattern") else ""))
    if sparsity is not None:
        lines.append(f"- real-zero sparsity of the prunable linear layers: {float(sparsity):.4%}")
    for k in ("created", "git_rev", "seed"):
        if manifest.get(k) is not None:
            lines.append(f"- {k}: {manifest[k]}")
    lines += ["", "Pruned weights are stored as exact zeros in dense safetensors: plain `transformers` loads "
              "this directory (`from_pretrained`) without prunetune. `masks.safetensors`, when present, holds "
              "the pruning masks; `manifest.json` says how the model was made.", ""]
    if rows:
        lines += ["## Metrics", "", "| metric | value | protocol |", "|---|---|---|"]
        lines += [f"| {_cell(n)} | {_cell(v)} | {_cell(p)} |" for n, v, p in rows]
        lines.append("")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(directory: Path | str, manifest: dict | None, card: dict | None = None,
                     config: Any = None) -> Path:
    """Write `README.md` into `directory` (inside an atomic write: it appears with the weights or not at all)."""
    path = Path(directory) / CARD_FILE
    build_model_card(manifest, card, config).save(path)
    return path
