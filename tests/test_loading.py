"""Model loading for every alias and head, the cached GGUF conversion, and architecture adapters."""

from __future__ import annotations

import pytest
import torch

from prunetune.errors import PrunetuneError
from prunetune.models.arch import get_adapter, nonzero_count, parameter_count
from prunetune.models.loading import gguf_to_hf_dir, load_model, natural_task, smollm2_gguf_path


# ------------------------------------------------------------------------------------------ tiny aliases
@pytest.mark.parametrize("alias,task,cls", [
    ("tiny-llama", "causal-lm", "LlamaForCausalLM"),
    ("tiny-llama", "base", "LlamaModel"),
    ("tiny-bert", "masked-lm", "BertForMaskedLM"),
    ("tiny-bert", "base", "BertModel"),
    ("tiny-t5", "seq2seq", "T5ForConditionalGeneration"),
    ("tiny-t5", "causal-lm", "T5ForConditionalGeneration"),  # an encoder-decoder's LM head is seq2seq
])
def test_tiny_alias_heads(alias, task, cls):
    loaded = load_model(alias, task)
    assert type(loaded.model).__name__ == cls
    assert not loaded.model.training


def test_tiny_models_are_seeded_identically():
    a, b = load_model("tiny-llama").model, load_model("tiny-llama").model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-bert"])
def test_seq_cls_head_from_labels_and_padding(alias):
    labels = ["business", "sport", "tech"]
    loaded = load_model(alias, "seq-cls", label_names=labels)
    m, tok = loaded.model, loaded.tokenizer
    assert m.config.num_labels == 3 and m.config.id2label == {0: "business", 1: "sport", 2: "tech"}
    assert tok.pad_token_id is not None and m.config.pad_token_id == tok.pad_token_id
    enc = tok(["a short one", "a much longer input sentence"], padding=True, return_tensors="pt")
    with torch.no_grad():
        batched = m(**enc).logits
        alone = m(**tok(["a short one"], return_tensors="pt")).logits
    assert batched.shape == (2, 3)
    assert torch.allclose(batched[0], alone[0], atol=1e-5)  # padding does not change the prediction


def test_seq_cls_needs_two_labels():
    with pytest.raises(PrunetuneError, match="num_labels >= 2"):
        load_model("tiny-llama", "seq-cls", num_labels=1)


@pytest.mark.parametrize("alias,task", [("tiny-llama", "masked-lm"), ("tiny-bert", "causal-lm"), ("tiny-bert", "seq2seq")])
def test_tiny_alias_wrong_task(alias, task):
    with pytest.raises(PrunetuneError, match="not available"):
        load_model(alias, task)


def test_unknown_task_and_spec(tmp_path):
    with pytest.raises(PrunetuneError, match="unknown task 'nope'"):
        load_model("tiny-llama", "nope")
    with pytest.raises(PrunetuneError, match="known aliases: smollm2-135m"):
        load_model(str(tmp_path / "missing-model"))
    with pytest.raises(PrunetuneError, match="without config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{garbage")
    with pytest.raises(PrunetuneError, match="cannot read a model config"):
        load_model(str(tmp_path))
    with pytest.raises(PrunetuneError, match="cannot read a model config"):
        natural_task(str(tmp_path))


def test_hub_id_offline_is_one_clear_error():
    with pytest.raises(PrunetuneError, match="not a known alias .*(unreachable|did not provide)"):
        load_model("no-such-org-xyz/no-such-model")


def test_saved_seq_cls_dir_round_trip(tmp_path):
    loaded = load_model("tiny-llama", "seq-cls", label_names=["neg", "pos"])
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    task, kw = natural_task(str(tmp_path))
    assert task == "seq-cls" and kw == {"label_names": ["neg", "pos"]}
    again = load_model(str(tmp_path), task, **kw)
    assert torch.equal(again.model.score.weight, loaded.model.score.weight)  # the trained head is kept


# ------------------------------------------------------------------------------------------ adapters
def test_tiny_adapter_geometry():
    llama = get_adapter(load_model("tiny-llama").model)
    g = llama.attention()
    assert (g.num_heads, g.num_kv_heads, g.head_dim, g.hidden_size, g.kv_groups) == (4, 2, 16, 64, 2)
    assert llama.mlp_width() == 128 and len(llama.blocks()) == 2 and len(llama.linears()) == 14
    assert llama.linears()["model.layers.1.self_attn.k_proj"][1].out_features == 2 * 16  # GQA: 2 KV heads

    bert = get_adapter(load_model("tiny-bert", "masked-lm").model)
    assert [b.stack for b in bert.blocks()] == ["encoder", "encoder"]
    assert set(bert.blocks()[0].linears) == {"q", "k", "v", "o", "up", "down"}
    assert bert.attention().kv_groups == 1 and bert.mlp_width() == 128

    t5 = get_adapter(load_model("tiny-t5", "seq2seq").model)
    stacks = [b.stack for b in t5.blocks()]
    assert stacks == ["encoder", "encoder", "decoder", "decoder"]
    assert set(t5.blocks()[2].linears) == {"q", "k", "v", "o", "cq", "ck", "cv", "co", "up", "down"}
    assert len(t5.linears()) == 2 * 6 + 2 * 10


def test_unsupported_family_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(PrunetuneError, match="'gpt2' is not supported; supported families: llama.*bert.*t5"):
        get_adapter(model)


def test_parameter_and_nonzero_count_tied_once():
    m = load_model("tiny-llama").model
    assert parameter_count(m) == sum(p.numel() for p in m.parameters())
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[:3] = 0
    assert nonzero_count(m) <= parameter_count(m) - 3 * 64


# ------------------------------------------------------------------------------------------ real models
@pytest.mark.slow
def test_smollm2_geometry_and_cache_loads_with_plain_transformers(smollm2):
    from transformers import AutoModelForCausalLM

    ad = get_adapter(smollm2.model)
    g = ad.attention()
    assert (g.num_heads, g.num_kv_heads, g.head_dim, g.kv_groups) == (9, 3, 64, 3)
    assert ad.mlp_width() == 1536 and len(ad.blocks()) == 30 and len(ad.linears()) == 210
    cached = gguf_to_hf_dir(smollm2_gguf_path())
    plain = AutoModelForCausalLM.from_pretrained(cached)  # no prunetune code involved
    ids = smollm2.tokenizer("Pruning a language model", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, smollm2.model(ids).logits)
    assert getattr(plain.config, "quantization_config", None) is None  # plain fp32, no GGUF quant config left
    assert plain.dtype == torch.float32


@pytest.mark.slow
def test_smollm2_seq_cls_with_pad_token():
    loaded = load_model("smollm2-135m", "seq-cls", num_labels=5)
    m, tok = loaded.model, loaded.tokenizer
    assert type(m).__name__ == "LlamaForSequenceClassification" and m.config.num_labels == 5
    assert tok.pad_token_id is not None and m.config.pad_token_id == tok.pad_token_id
    enc = tok(["short", "a longer sentence than the first"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert m(**enc).logits.shape == (2, 5)


@pytest.mark.slow
def test_minilm_heads():
    base = load_model("minilm-l6", "base")
    assert type(base.model).__name__ == "BertModel"
    g = get_adapter(base.model).attention()
    assert (g.num_heads, g.head_dim, g.hidden_size) == (12, 32, 384) and len(get_adapter(base.model).blocks()) == 6
    cls = load_model("minilm-l6", "seq-cls", label_names=list("abcde"))
    assert type(cls.model).__name__ == "BertForSequenceClassification" and cls.model.config.num_labels == 5
    with pytest.raises(PrunetuneError, match="no masked-LM head"):
        load_model("minilm-l6", "masked-lm")
    with pytest.raises(PrunetuneError, match="encoder"):
        load_model("minilm-l6", "causal-lm")
