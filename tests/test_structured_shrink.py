"""Physical removal of heads, neurons and hidden channels (`structured.shrink`).

The shrunk model must compute what the masked model computed (heads and neurons: identical logits; hidden
channels: within 1e-3, measured ~1e-7 with the RMSNorm gain and eps correction), its config must describe its
tensors, GQA groups must stay whole, and stock transformers must load the saved directory.
"""

from __future__ import annotations

import copy

import pytest
import torch

from prunetune.errors import PrunetuneError
from prunetune.models.arch import get_adapter
from prunetune.models.loading import tiny_model
from prunetune.pruning.api import prune
from prunetune.pruning.masks import MaskSet
from prunetune.pruning.shrink.scores import structure_scores
from prunetune.pruning.shrink.surgery import keep_from_masks, mask_structures, shrink
from prunetune.pruning.shrink.widths import keep_from_scores

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
IDS = torch.randint(5, 250, (2, 16), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(5, 250, (4, 16), generator=torch.Generator().manual_seed(0))


def _logits(model, **kw) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=torch.ones_like(IDS), **kw).logits


def _reload(model, tmp_path, auto: str):
    import transformers

    model.save_pretrained(tmp_path / "shrunk")
    return getattr(transformers, auto).from_pretrained(tmp_path / "shrunk").eval()


def assert_config_matches_shapes(model) -> None:
    """Every projection's shape follows from the config alone (what from_pretrained will build)."""
    c = model.config
    a = get_adapter(model)
    g = a.attention()
    for block in a.blocks():
        lin = block.linears
        assert lin["up"].weight.shape == (a.mlp_width(), g.hidden_size)
        assert lin["down"].weight.shape == (g.hidden_size, a.mlp_width())
        assert lin["q"].weight.shape == (g.num_heads * g.head_dim, g.hidden_size)
        assert lin["k"].weight.shape == (g.num_kv_heads * g.head_dim, g.hidden_size)
        assert lin["o"].weight.shape == (g.hidden_size, g.num_heads * g.head_dim)
    assert model.get_input_embeddings().weight.shape[1] == g.hidden_size
    if c.model_type in LLAMA_FAMILY:
        assert g.num_heads == c.num_attention_heads and g.num_kv_heads == c.num_key_value_heads
        assert g.head_dim == 16


# --------------------------------------------------------------------------- heads and neurons: exact
@pytest.mark.parametrize("model_type", LLAMA_FAMILY)
@pytest.mark.parametrize("kinds", [("heads",), ("neurons",), ("heads", "neurons")], ids="+".join)
def test_shrink_masked_heads_neurons_is_exact_and_reloads(model_type, kinds, tmp_path):
    model = tiny_model(model_type, "causal-lm").model
    dense = copy.deepcopy(model)
    masks = MaskSet()
    for kind in kinds:
        masks.update(prune(model, "wanda", 0.5, granularity=kind, calib=CALIB))
    masked = _logits(model)
    plan = keep_from_masks(model, masks, kinds)
    summary = shrink(model, masks)
    assert {k: v["after"] for k, v in summary.items()} == {k: 1 if k == "heads" else 64 if k in kinds else 128
                                                           for k in ("heads", "neurons")} | ({} if "heads" in kinds else {"heads": 2})
    shrunk = _logits(model)
    diff = float((shrunk - masked).abs().max())
    assert diff <= 1e-5, diff
    assert_config_matches_shapes(model)

    # GQA groups whole: the kept KV head's k/v rows, its query heads' q rows and o columns, and nothing else
    g0 = get_adapter(dense).attention()
    for b, (old, new) in enumerate(zip(get_adapter(dense).blocks(), get_adapter(model).blocks())):
        if "heads" in kinds:
            kv = torch.nonzero(plan["heads"][b]).flatten()
            q_rows = torch.cat([torch.arange(h * g0.kv_groups * 16, (h + 1) * g0.kv_groups * 16) for h in kv])
            kv_rows = torch.cat([torch.arange(h * 16, (h + 1) * 16) for h in kv])
            assert torch.equal(new.linears["q"].weight, old.linears["q"].weight[q_rows])
            assert torch.equal(new.linears["k"].weight, old.linears["k"].weight[kv_rows])
            assert torch.equal(new.linears["v"].weight, old.linears["v"].weight[kv_rows])
            assert torch.equal(new.linears["o"].weight, old.linears["o"].weight[:, q_rows])
            if model_type == "qwen2":  # q/k/v biases travel with their rows
                assert torch.equal(new.linears["q"].bias, old.linears["q"].bias[q_rows])
                assert torch.equal(new.linears["k"].bias, old.linears["k"].bias[kv_rows])
        if "neurons" in kinds:
            keep = torch.nonzero(plan["neurons"][b]).flatten()
            assert torch.equal(new.linears["gate"].weight, old.linears["gate"].weight[keep])
            assert torch.equal(new.linears["down"].weight, old.linears["down"].weight[:, keep])

    reloaded = _reload(model, tmp_path, "AutoModelForCausalLM")
    assert reloaded.config.num_key_value_heads == model.config.num_key_value_heads
    assert torch.equal(_logits(reloaded), shrunk)
    n_params = sum(p.numel() for p in reloaded.parameters())
    assert n_params < sum(p.numel() for p in dense.parameters())


@pytest.mark.parametrize("model_type,auto", [("bert", "AutoModelForSequenceClassification"),
                                             ("distilbert", "AutoModelForSequenceClassification"),
                                             ("roberta", "AutoModelForSequenceClassification"),
                                             ("t5", "AutoModelForSeq2SeqLM"), ("mt5", "AutoModelForSeq2SeqLM")])
def test_shrink_neurons_other_families(model_type, auto, tmp_path):
    task = "seq2seq" if "t5" in model_type else "seq-cls"
    model = tiny_model(model_type, task, num_labels=3).model
    kw = {"decoder_input_ids": IDS[:, :5]} if task == "seq2seq" else {}
    prune(model, "magnitude", 0.25, granularity="neurons")
    masked = _logits(model, **kw)
    assert shrink(model, MaskSet.from_model(model)) == {"neurons": {"before": 128, "after": 96}}
    assert get_adapter(model).mlp_width() == 96
    assert float((_logits(model, **kw) - masked).abs().max()) <= 1e-5
    assert torch.equal(_logits(_reload(model, tmp_path, auto), **kw), _logits(model, **kw))


# --------------------------------------------------------------------------- hidden channels: RMSNorm
@pytest.mark.parametrize("model_type,tied", [("llama", False), ("llama", True), ("qwen2", True), ("qwen3", False)])
def test_shrink_hidden_rescales_rmsnorm(model_type, tied, tmp_path):
    model = tiny_model(model_type, "causal-lm", tie_word_embeddings=tied).model
    scores = torch.rand(64, generator=torch.Generator().manual_seed(3))
    plan = keep_from_scores(model, {"hidden": scores}, sparsity=0.5, round_to=16)
    assert int(plan["hidden"].sum()) == 32 and bool(plan["hidden"][torch.topk(scores, 32).indices].all())
    mask_structures(model, plan)
    masked = _logits(model)
    uncorrected = copy.deepcopy(model)
    shrink(model, plan)
    shrunk = _logits(model)
    diff = float((shrunk - masked).abs().max())
    assert diff <= 1e-3, diff
    assert model.config.hidden_size == 32 and model.config.head_dim == 16
    assert_config_matches_shapes(model)
    if tied:
        assert model.lm_head.weight is model.get_input_embeddings().weight
    reloaded = _reload(model, tmp_path, "AutoModelForCausalLM")
    assert torch.equal(_logits(reloaded), shrunk)
    # the correction matters: the same removal without rescaling gains and eps moves the logits far more
    a = get_adapter(uncorrected)
    plain = {n: m.weight.clone() for n, m in uncorrected.named_modules() if m in a.hidden_norms()}
    shrink(uncorrected, plan)
    for n, m in uncorrected.named_modules():
        if n in plain:
            m.weight.data = plain[n][plan["hidden"]]
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = 1e-6
    assert float((_logits(uncorrected) - masked).abs().max()) > 100 * max(diff, 1e-6)


def test_all_three_structures_on_llama(tmp_path):
    model = tiny_model("llama", "causal-lm").model
    g = torch.Generator().manual_seed(4)
    scores = {"heads": torch.rand(2, 2, generator=g), "neurons": torch.rand(2, 128, generator=g),
              "hidden": torch.rand(64, generator=g)}
    plan = keep_from_scores(model, scores, sparsity={"heads": 0.5, "neurons": 0.4, "hidden": 0.25},
                            round_to={"neurons": 32, "hidden": 16})
    mask_structures(model, plan)
    masked = _logits(model)
    summary = shrink(model, plan)
    assert {k: v["after"] for k, v in summary.items()} == {"heads": 1, "neurons": 64, "hidden": 48}
    assert float((_logits(model) - masked).abs().max()) <= 1e-3
    assert model.config.prunetune_shrink == {"heads": {"before": 2, "after": 1}, "neurons": {"before": 128, "after": 64},
                                             "hidden": {"before": 64, "after": 48}}
    assert_config_matches_shapes(model)
    assert torch.equal(_logits(_reload(model, tmp_path, "AutoModelForCausalLM")), _logits(model))


# --------------------------------------------------------------------------- plans from scores, rounding
def test_keep_from_scores_uniform_topk_and_rounding():
    model = tiny_model("llama", "causal-lm").model
    sc = torch.arange(2 * 128, dtype=torch.float).reshape(2, 128)
    sc[1] = sc[1].flip(0)
    # 30% of 128 -> 89.6 -> 90 kept, rounded to the nearest multiple of 64 -> 64 (drops 26 by score)
    plan = keep_from_scores(model, {"neurons": sc}, sparsity=0.3)
    assert plan["neurons"].sum(1).tolist() == [64, 64]
    assert plan["neurons"][0, 64:].all() and plan["neurons"][1, :64].all()
    # 20% -> 102.4 -> 102 kept -> rounds up to 128 (adds structures back by score): no neuron removed
    assert keep_from_scores(model, {"neurons": sc}, sparsity=0.2)["neurons"].all()
    # multiple of 8: 90 -> 88, the 88 best per layer
    plan = keep_from_scores(model, {"neurons": sc}, sparsity=0.3, round_to=8)
    assert plan["neurons"].sum(1).tolist() == [88, 88] and plan["neurons"][0, 40:].all()
    # heads round in whole KV groups; an explicit keep count wins over sparsity
    heads = keep_from_scores(model, {"heads": torch.tensor([[0.1, 0.9], [0.8, 0.2]])}, keep=1)["heads"]
    assert heads.tolist() == [[False, True], [True, False]]


@pytest.mark.parametrize("kind,sparsity", [("heads", 0.5), ("neurons", 0.25)])
def test_plan_from_structure_scores_matches_structured_pruning(kind, sparsity):
    """The shrink plan from |W| structure scores removes exactly what prune(granularity=kind) masks."""
    model = tiny_model("qwen2", "causal-lm").model
    plan = keep_from_scores(model, {kind: structure_scores(model, kind)}, sparsity=sparsity, round_to=1)
    prune(model, "magnitude", sparsity, granularity=kind)
    assert torch.equal(plan[kind], keep_from_masks(model, None, (kind,))[kind])


def test_bad_inputs_are_one_line_errors():
    model = tiny_model("llama", "causal-lm").model
    with pytest.raises(PrunetuneError, match="round_to 256 is larger than the 128 MLP neurons") as e:
        keep_from_scores(model, {"neurons": torch.rand(2, 128)}, sparsity=0.5, round_to=256)
    assert "\n" not in str(e.value)
    with pytest.raises(PrunetuneError, match="removes? every attention head"):
        keep_from_scores(model, {"heads": torch.rand(2, 2)}, sparsity=0.9)
    with pytest.raises(PrunetuneError, match="removes? every attention head"):
        shrink(model, {"heads": torch.tensor([[True, False], [False, False]])})
    with pytest.raises(PrunetuneError, match="layers keep different counts .*no per-layer widths"):
        shrink(model, {"neurons": torch.cat([torch.ones(1, 128), torch.zeros(1, 128)]).bool()
                       | (torch.arange(128) < 64)})
    masks = prune(model, "magnitude", 0.5, granularity="heads")
    for name in masks.names():  # layer 0 keeps both KV groups, layer 1 one: non-uniform masks
        if ".layers.0." in name:
            masks[name] = torch.ones_like(masks[name])
    with pytest.raises(PrunetuneError, match=r"heads: layers keep different counts \(2, 1\)"):
        shrink(model, masks)
    for name in masks.names():
        if ".layers.0." in name:
            masks[name] = torch.zeros_like(masks[name])
    with pytest.raises(PrunetuneError, match="removes every attention head of a layer"):
        shrink(model, masks)

    # LlamaConfig wants hidden_size % num_attention_heads == 0: 42 channels with 4 heads is refused up front
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PrunetuneError, match="LlamaConfig refuses: .*The hidden size \\(42\\) is not a multiple"):
        shrink(model, keep_from_scores(model, {"hidden": torch.rand(64)}, keep=42, round_to=1))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    bert = tiny_model("bert", "seq-cls", num_labels=2).model
    with pytest.raises(PrunetuneError, match="^hidden-dimension pruning needs an RMSNorm family; bert") as e:
        shrink(bert, {"hidden": torch.ones(64, dtype=torch.bool)})
    assert "\n" not in str(e.value)
    with pytest.raises(PrunetuneError, match="bert models cannot shrink heads: its config has no head_dim"):
        shrink(bert, {"heads": torch.ones(2, 4, dtype=torch.bool)})


def test_info_shows_the_shrunk_widths(tmp_path, capsys):
    from cli_helpers import cli_ok

    loaded = tiny_model("llama", "causal-lm")
    model = loaded.model
    g = torch.Generator().manual_seed(5)
    shrink(model, keep_from_scores(model, {"heads": torch.rand(2, 2, generator=g),
                                           "neurons": torch.rand(2, 128, generator=g)}, sparsity=0.5))
    model.save_pretrained(tmp_path / "m")
    loaded.tokenizer.save_pretrained(tmp_path / "m")
    out = cli_ok(["info", str(tmp_path / "m"), "--no-layers", "--json", str(tmp_path / "info.json")], capsys)
    assert "kv heads 2 -> 1, mlp width 128 -> 64" in out
    import json

    info = json.loads((tmp_path / "info.json").read_text())
    assert (info["heads"], info["kv_heads"], info["head_dim"], info["mlp_width"]) == (2, 1, 16, 64)
    assert info["shrunk"] == {"neurons": {"before": 128, "after": 64}, "heads": {"before": 2, "after": 1}}
