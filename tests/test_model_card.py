"""Every export carries a Hugging Face model card that huggingface_hub's own card utilities parse (issue 30, item 8)."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from cli_helpers import cli_ok


def _card(d):
    card = ModelCard.load(d / "README.md")
    return card, card.data.to_dict()


def test_prune_export_has_a_parsable_model_card(tmp_path, capfd):
    out = tmp_path / "p"
    cli_ok(["prune", "tiny-llama", "--method", "magnitude", "--sparsity", "0.5", "--out", str(out)], capfd)
    card, meta = _card(out / "model")
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"prunetune", "pruned", "sparse", "magnitude"} <= set(meta["tags"])
    assert "structured" not in meta["tags"]
    assert meta["pruning_method"] == "magnitude"
    assert meta["sparsity"] == pytest.approx(0.5, abs=1e-6)  # real zeros of the prunable linears
    assert "base_model" not in meta  # a random tiny model has no hub id
    # the table lists the run's stage metrics, each with its protocol
    assert "| 01-prune/sparsity | 0.5 | what=share of exact zeros" in card.text and "zeros=36864" in card.text
    # the stage's own model directory has one too, and plain transformers still loads the export
    assert (out / "stages" / "01-prune" / "model" / "README.md").is_file()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "model") is not None


def test_semi_structured_and_chained_card(tmp_path, capfd):
    """N:M exports say so in their tags; a model made from an export inherits its base model."""
    from prunetune.models.card import build_model_card, hub_base_model

    out = tmp_path / "nm"
    cli_ok(["prune", "tiny-llama", "--method", "magnitude", "--pattern", "2:4", "--out", str(out)], capfd)
    _, meta = _card(out / "model")
    assert {"semi-structured", "2:4-sparsity"} <= set(meta["tags"])
    assert meta["prunetune"]["pattern"] == "2:4"
    assert hub_base_model("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_base_model("minilm-l6") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_base_model("some-org/some-model") == "some-org/some-model"
    assert hub_base_model(str(tmp_path / "nowhere")) is None
    # an export whose card names a base model passes it on (a model pruned, then fine-tuned)
    card = build_model_card({"metrics": {}}, {"base_model": "minilm-l6", "method": "wanda", "sparsity": 0.25})
    (tmp_path / "base").mkdir()
    card.save(tmp_path / "base" / "README.md")
    assert hub_base_model(str(tmp_path / "base")) == "sentence-transformers/all-MiniLM-L6-v2"
    parsed = ModelCard.load(tmp_path / "base" / "README.md").data.to_dict()
    assert parsed["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and parsed["sparsity"] == 0.25


def test_structured_shrink_card(tmp_path, capfd):
    out = tmp_path / "s"
    cli_ok(["shrink", "tiny-llama", "--method", "l1", "--sparsity", "0.3", "--round-to", "8", "--out", str(out)], capfd)
    _, meta = _card(out / "model")
    assert {"structured", "shrunk", "l1-structured"} <= set(meta["tags"])
    assert meta["pruning_method"] == "l1-structured"
