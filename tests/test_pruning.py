"""Pruning engine on tiny models: criteria against hand computations, exact sparsity, calibration flow."""

from __future__ import annotations

import math

import pytest
import torch

from prunetune.errors import PrunetuneError
from prunetune.models.arch import get_adapter
from prunetune.models.loading import load_model
from prunetune.pruning.api import prune
from prunetune.pruning.criteria.wanda import ColumnNormStats, wanda_scores
from prunetune.pruning.granularity import unstructured_mask
from prunetune.pruning.masks import MaskSet, sparsity_report
from prunetune.pruning.shrink.surgery import remove_pruned


def _ids(n=8, seqlen=64, vocab=259, seed=0):
    return torch.randint(3, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _linears(model):
    return {n: lin for n, (_, lin) in get_adapter(model).linears().items()}


def _dense_copy(model):
    return {n: lin.weight.detach().clone() for n, lin in _linears(model).items()}


def test_wanda_scores_match_hand_formula():
    W = torch.tensor([[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]])
    X = torch.tensor([[[1.0, 0.0, 2.0], [3.0, 1.0, 0.0]]])  # 1 sample, 2 tokens, 3 features
    st = ColumnNormStats(3)
    st.add(X)
    scores = wanda_scores(W, st.norms())
    for i in range(2):
        for j in range(3):
            norm_j = math.sqrt(sum(float(X[0, t, j]) ** 2 for t in range(2)))
            assert scores[i, j].item() == pytest.approx(abs(W[i, j].item()) * norm_j, rel=1e-6)
    # per output row, 1/3 sparsity drops the lowest |W|*||X|| of each row: column 1 in both rows
    mask = unstructured_mask(scores, 1 / 3 + 1e-9, per="row")
    assert mask.tolist() == [[True, False, True], [True, False, True]]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_every_group_has_exact_zeros(tiny_llama, method, pattern):
    n, m = (int(x) for x in pattern.split(":"))
    masks = prune(tiny_llama.model, method, pattern=pattern, calib=_ids())
    for name, lin in _linears(tiny_llama.model).items():
        w = lin.weight.detach()
        zeros = (w == 0).reshape(w.shape[0], -1, m).sum(-1)
        assert (zeros == m - n).all(), name
        assert torch.equal(masks[name], w != 0)


@pytest.mark.parametrize("method,granularity", [("magnitude", "row"), ("magnitude", "layer"), ("wanda", "row"),
                                                ("wanda", "layer"), ("sparsegpt", "row"), ("sparsegpt", "layer")])
def test_sparsity_exact_per_layer(tiny_llama, method, granularity):
    s = 0.3  # not a multiple of 1/in_features: rounding must still be exact
    prune(tiny_llama.model, method, s, granularity=granularity, calib=_ids())
    rep = sparsity_report(tiny_llama.model)
    for name, lin in _linears(tiny_llama.model).items():
        rows, cols = lin.weight.shape
        zeros = (lin.weight == 0)
        if granularity == "row":
            assert (zeros.sum(1) == math.floor(s * cols)).all(), name
        else:
            assert int(zeros.sum()) == math.floor(s * rows * cols), name
        assert rep["layers"][name]["zeros"] == int(zeros.sum())


def test_global_sparsity_exact_total(tiny_llama):
    prune(tiny_llama.model, "wanda", 0.45, granularity="global", calib=_ids())
    rep = sparsity_report(tiny_llama.model)
    assert rep["zeros"] == math.floor(0.45 * rep["numel"])
    # global thresholds give layers different sparsities
    assert len({round(r["sparsity"], 3) for r in rep["layers"].values()}) > 1


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_weights_outside_mask_unchanged(tiny_llama, method):
    before = _dense_copy(tiny_llama.model)
    masks = prune(tiny_llama.model, method, 0.5, calib=_ids())
    for name, lin in _linears(tiny_llama.model).items():
        keep = masks[name]
        assert torch.equal(lin.weight[keep], before[name][keep]), name
        assert (lin.weight[~keep] == 0).all()
        assert int((~keep).sum()) == before[name].numel() // 2


def test_sparsegpt_updates_surviving_weights(tiny_llama):
    before = _dense_copy(tiny_llama.model)
    masks = prune(tiny_llama.model, "sparsegpt", 0.5, calib=_ids())
    name = next(iter(masks.names()))
    w = _linears(tiny_llama.model)[name].weight
    assert not torch.equal(w[masks[name]], before[name][masks[name]])  # OBS moved the survivors


def test_sequential_calibration_feeds_pruned_outputs(tiny_llama):
    """Block 1's statistics must come from the outputs of the already pruned block 0."""
    model = tiny_llama.model
    ids = _ids()
    target = "model.layers.1.self_attn.q_proj"
    seen = {}
    prune(model, "wanda", 0.5, calib=ids, stats_hook=lambda n, st: seen.__setitem__(n, st.norms().clone()))

    def norms_now(m):
        acc = ColumnNormStats(64)
        h = m.get_submodule(target).register_forward_hook(lambda _m, i, _o: acc.add(i[0]))
        with torch.no_grad():
            m(input_ids=ids, use_cache=False)
        h.remove()
        return acc.norms()

    # q_proj of block 1 reads the (pruned) block-0 output; the pruned model reproduces what calibration saw
    assert torch.allclose(seen[target], norms_now(model), rtol=1e-4)
    dense = load_model("tiny-llama", "causal-lm").model
    assert not torch.allclose(seen[target], norms_now(dense), rtol=1e-3)


def test_heads_remove_whole_kv_groups(tiny_llama):
    model = tiny_llama.model
    g = get_adapter(model).attention()  # 4 query heads, 2 KV heads, head_dim 16
    masks = prune(model, "wanda", 0.5, granularity="heads", calib=_ids())
    hd, per_kv = g.head_dim, g.kv_groups * g.head_dim
    for b in range(2):
        a = model.model.layers[b].self_attn
        k_alive = (a.k_proj.weight != 0).any(1).reshape(g.num_kv_heads, hd).any(1)
        v_alive = (a.v_proj.weight != 0).any(1).reshape(g.num_kv_heads, hd).any(1)
        q_alive = (a.q_proj.weight != 0).any(1).reshape(g.num_kv_heads, per_kv).any(1)
        o_alive = (a.o_proj.weight != 0).any(0).reshape(g.num_kv_heads, per_kv).any(1)
        assert int(k_alive.sum()) == 1  # floor(0.5 * 2) groups removed
        assert torch.equal(k_alive, v_alive) and torch.equal(k_alive, q_alive) and torch.equal(k_alive, o_alive)
        # the surviving group is fully dense
        assert (a.k_proj.weight.reshape(g.num_kv_heads, hd, -1)[k_alive] != 0).all()
    assert all(n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj") for n in masks.names())
    ids = _ids(2, 32)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        removed = remove_pruned(model, "heads")
        assert len(removed) == 2 and set(removed.values()) == {1}
        assert model.model.layers[0].self_attn.k_proj.weight.shape[0] == hd
        shrunk = model(input_ids=ids).logits
    assert torch.allclose(masked, shrunk, atol=1e-5)


def test_neurons_across_gate_up_down(tiny_llama):
    model = tiny_llama.model
    prune(model, "magnitude", 0.25, granularity="neurons")
    for layer in model.model.layers:
        mlp = layer.mlp
        gate = (mlp.gate_proj.weight != 0).any(1)
        assert torch.equal(gate, (mlp.up_proj.weight != 0).any(1))
        assert torch.equal(gate, (mlp.down_proj.weight != 0).any(0))
        assert int((~gate).sum()) == 32  # floor(0.25 * 128)
        assert (layer.self_attn.q_proj.weight != 0).all()  # attention untouched
    ids = _ids(2, 32)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        remove_pruned(model, "neurons")
        assert model.model.layers[0].mlp.up_proj.weight.shape[0] == 96
        assert torch.allclose(masked, model(input_ids=ids).logits, atol=1e-5)


def test_structured_rows_cols(tiny_llama):
    masks = prune(tiny_llama.model, "wanda", 0.5, granularity="cols", calib=_ids())
    for name, lin in _linears(tiny_llama.model).items():
        dead_cols = (lin.weight == 0).all(0)
        assert int(dead_cols.sum()) == lin.weight.shape[1] // 2, name
        assert torch.equal(masks[name], lin.weight != 0)


def test_skip_patterns(tiny_llama):
    before = _dense_copy(tiny_llama.model)
    masks = prune(tiny_llama.model, "magnitude", 0.5, skip=[r"\.down_proj$", r"layers\.0\.self_attn"])
    assert "model.layers.1.mlp.down_proj" not in masks and "model.layers.0.self_attn.q_proj" not in masks
    assert torch.equal(tiny_llama.model.model.layers[1].mlp.down_proj.weight, before["model.layers.1.mlp.down_proj"])
    assert "model.layers.1.self_attn.q_proj" in masks
    with pytest.raises(PrunetuneError, match="matches no prunable layer"):
        prune(tiny_llama.model, "magnitude", 0.5, skip=["no_such_layer"])


def test_bad_inputs(tiny_llama):
    m = tiny_llama.model
    with pytest.raises(PrunetuneError, match=r"\[0, 1\)"):
        prune(m, "magnitude", 1.0)
    with pytest.raises(PrunetuneError, match="0 < N < M"):
        prune(m, "magnitude", pattern="4:4")
    with pytest.raises(PrunetuneError, match="needs calibration"):
        prune(m, "wanda", 0.5)
    with pytest.raises(PrunetuneError, match="unknown pruning method"):
        prune(m, "random", 0.5)
    with pytest.raises(PrunetuneError, match=r"has \d[\d,]* tokens"):
        prune(m, "wanda", 0.5, calib=_short_source(), tokenizer=tiny_llama.tokenizer, nsamples=4, seqlen=512)
    with pytest.raises(PrunetuneError, match="needs a tokenizer"):
        prune(m, "wanda", 0.5, calib=_short_source())
    with pytest.raises(PrunetuneError, match="sparsegpt prunes with granularity layer | row"):
        prune(m, "sparsegpt", 0.5, granularity="heads", calib=_ids())
    assert sparsity_report(m)["zeros"] == 0  # nothing was pruned by any failed call


def _short_source():
    from prunetune.data.sources import TextSource

    return TextSource("hello world " * 50, "short", "test")


def test_calibration_from_named_source(tiny_llama, wikitext_dir):
    masks = prune(tiny_llama.model, "wanda", 0.5, calib="wikitext2", tokenizer=tiny_llama.tokenizer, nsamples=4,
                  seqlen=128)
    assert masks.sparsity() == pytest.approx(0.5)


@pytest.mark.parametrize("alias,task", [("tiny-bert", "masked-lm"), ("tiny-t5", "seq2seq")])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_other_families(alias, task, method):
    loaded = load_model(alias, task)
    masks = prune(loaded.model, method, 0.5, calib=_ids(4, 32, vocab=255))
    rep = sparsity_report(loaded.model)
    assert rep["sparsity"] == pytest.approx(0.5) and len(masks) == len(rep["layers"])
    assert MaskSet.from_model(loaded.model).sparsity() == pytest.approx(0.5)


@pytest.mark.parametrize("alias,task", [("tiny-bert", "masked-lm"), ("tiny-llama", "causal-lm")])
def test_captured_block_inputs_reproduce_the_model(alias, task):
    """Re-running block 0 on what was captured (hidden states, rotary embeddings / attention mask passed as
    the family passes them) gives exactly what block 0 computes inside the full model."""
    from prunetune.pruning.calibrate import _first, capture_block_inputs

    loaded = load_model(alias, task)
    block = get_adapter(loaded.model).blocks()[0].module
    ids = _ids(2, 16, vocab=255)
    hidden, args, kwargs = capture_block_inputs(loaded.model, block, ids, 2, torch.device("cpu"))[0]
    seen = {}
    h = block.register_forward_hook(lambda _m, _i, o: seen.__setitem__("out", _first(o).clone()))
    with torch.no_grad():
        loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        h.remove()
        again = _first(block(hidden, *args, **kwargs))
    assert torch.equal(again, seen["out"])


def test_prune_through_peft_wrapper(tiny_llama):
    """A user's LoRA model can be pruned directly; masks are keyed like the plain model and hit the base weights."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    masks = prune(peft_model, "wanda", 0.5, calib=_ids(4, 32))
    assert "model.layers.0.self_attn.q_proj" in masks and not any("base_layer" in n for n in masks.names())
    base_q = peft_model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(base_q != 0, masks["model.layers.0.self_attn.q_proj"])
    assert MaskSet.from_model(peft_model, masks.names()).sparsity() == pytest.approx(0.5)


def test_explicit_calibration_device_matches_default():
    """`device=` moves one block at a time to the calibration device and back; results must not change."""
    a, b = load_model("tiny-llama", "causal-lm"), load_model("tiny-llama", "causal-lm")
    ma = prune(a.model, "sparsegpt", 0.5, calib=_ids(4, 32))
    mb = prune(b.model, "sparsegpt", 0.5, calib=_ids(4, 32), device="cpu")
    assert all(torch.equal(ma[n], mb[n]) for n in ma.names())
    assert next(b.model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibration_batch_size_changes_nothing_but_memory(method):
    """Statistics are sums over tokens and each block's inputs are replaced in place by its outputs, so the
    calibration batch (a memory knob) must give the same masks and weights for every batch size."""
    runs = []
    for bs in (1, 3, 8):
        m = load_model("tiny-llama", "causal-lm").model
        masks = prune(m, method, 0.5, calib=_ids(8, 32), batch_size=bs)
        runs.append((masks, _dense_copy(m)))
    (ref_masks, ref_w), *others = runs
    for masks, weights in others:
        if method == "wanda":  # per-column norms: the same floats up to summation order, far from any tie
            assert all(torch.equal(ref_masks[n], masks[n]) for n in ref_masks.names())
            assert all(torch.equal(ref_w[n], weights[n]) for n in ref_w)
        else:  # OBS updates chain through the Hessian: allow a rare near-tie to flip, nothing more
            for n in ref_masks.names():
                agree = ref_masks[n] == masks[n]
                assert agree.float().mean() > 0.995
                assert torch.allclose(ref_w[n][agree], weights[n][agree], atol=1e-3)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_pruning_again_keeps_earlier_zeros(tiny_llama, method):
    """Bug 3 through the engine: 30% then 50% on the same model ends at exactly 50% per layer, and no weight
    pruned at 30% is alive afterwards (SparseGPT's OBS update used to revive some)."""
    model = tiny_llama.model
    first = prune(model, method, 0.3, granularity="layer", calib=_ids())
    zeros30 = {n: lin.weight == 0 for n, lin in _linears(model).items()}
    second = prune(model, method, 0.5, granularity="layer", calib=_ids())
    for name, lin in _linears(model).items():
        assert not (zeros30[name] & (lin.weight != 0)).any(), name
        assert int((lin.weight == 0).sum()) == lin.weight.numel() // 2, name
        assert torch.equal(second[name], lin.weight != 0) and not (second[name] & ~first[name]).any()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_previous_masks_stay_pruned(tiny_llama, method):
    """`previous=` masks not yet applied to the weights (an ordering round after fine-tuning) are honoured."""
    model = tiny_llama.model
    previous = MaskSet({n: torch.rand(lin.weight.shape, generator=torch.Generator().manual_seed(5)) > 0.2
                        for n, lin in _linears(model).items()})
    masks = prune(model, method, 0.5, granularity="layer", calib=_ids(), previous=previous)
    for name, lin in _linears(model).items():
        assert not (masks[name] & ~previous[name]).any(), name
        assert int((lin.weight == 0).sum()) == lin.weight.numel() // 2, name


def test_sparsegpt_default_is_the_papers_block_selection():
    """Bug 4: SparseGPT's default selection is adaptive over each whole 128-column block (`layer`), so rows
    of a layer end with different counts while the layer's total is exact; `row` stays available."""
    from prunetune.config import PruneSpec
    from prunetune.pruning.api import resolve_granularity

    a, b, c = (load_model("tiny-llama", "causal-lm") for _ in range(3))
    default = prune(a.model, "sparsegpt", 0.3, calib=_ids(4, 32))
    layer = prune(b.model, "sparsegpt", 0.3, granularity="layer", calib=_ids(4, 32))
    row = prune(c.model, "sparsegpt", 0.3, granularity="row", calib=_ids(4, 32))
    assert all(torch.equal(default[n], layer[n]) for n in default.names())
    per_row = {int(x) for n in default.names() for x in (~default[n]).sum(1)}
    assert len(per_row) > 1  # the block-wide choice prunes rows unevenly
    assert all(((~row[n]).sum(1) == math.floor(0.3 * row[n].shape[1])).all() for n in row.names())
    assert PruneSpec().granularity is None
    assert resolve_granularity("sparsegpt", None) == "layer" and resolve_granularity("wanda", None) == "row"
    assert resolve_granularity("sparsegpt", "row") == "row"


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_leaves_process_state_alone(tiny_llama, method, monkeypatch):
    """Bug 2: prune() used to call torch.manual_seed(seed) (resetting dropout in a PAYT run at every pruning
    event) and to change glibc's mmap threshold for the whole process. Neither may happen."""
    from prunetune.data.sources import TextSource
    from prunetune.pruning import calibrate

    calls: list[str] = []

    class FakeLibc:
        def malloc_trim(self, _pad):
            calls.append("malloc_trim")

        def mallopt(self, *_args):
            calls.append("mallopt")

    monkeypatch.setattr(calibrate, "_LIBC", FakeLibc())
    torch.manual_seed(1234)
    torch.rand(3)
    state = torch.get_rng_state()
    text = TextSource("the cat sat on the mat and looked at the dog " * 400, "cats", "test")
    prune(tiny_llama.model, method, 0.5, calib=text, tokenizer=tiny_llama.tokenizer, nsamples=4, seqlen=32, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert "mallopt" not in calls


def test_maskset_enforce_copies_no_mask(tiny_llama, monkeypatch):
    """Bug 9: enforcing after every step must not copy masks (host->device on a GPU): a mask is moved to its
    weight's device at most once, then used in place. Counted on any device through Tensor.to."""
    model = tiny_llama.model
    masks = MaskSet({n: torch.rand(lin.weight.shape, generator=torch.Generator().manual_seed(6)) > 0.5
                     for n, lin in _linears(model).items()})
    masks.apply(model)  # first application may move masks to the weights' device
    held = {n: m for n, m in masks.items()}
    calls = []
    real_to = torch.Tensor.to

    def counting_to(self, *a, **kw):
        if self.dtype == torch.bool:
            calls.append(tuple(self.shape))
        return real_to(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    for _ in range(3):
        with torch.no_grad():
            for lin in _linears(model).values():
                lin.weight.add_(1.0)  # an "optimizer step" that revives everything
        masks.enforce(model)
    monkeypatch.undo()
    assert calls == []
    for name, lin in _linears(model).items():
        assert masks[name] is held[name] and masks[name].device == lin.weight.device
        assert torch.equal(lin.weight != 0, masks[name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_maskset_moves_masks_to_the_weights_device_once(tiny_llama):
    model = tiny_llama.model.cuda()
    masks = MaskSet({n: torch.ones(lin.weight.shape, dtype=torch.bool) for n, lin in _linears(model).items()})
    masks.apply(model)
    first = {n: m for n, m in masks.items()}
    masks.apply(model)
    assert all(masks[n] is first[n] and masks[n].is_cuda for n in masks.names())


# ------------------------------------------------------------------------------------- bit-packed mask storage
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (8, 8), (64, 33), (2, 3, 11)])
def test_packed_mask_round_trip_is_exact(shape):
    from prunetune.pruning.masks import PackedMask

    g = torch.Generator().manual_seed(sum(shape))
    for density in (0.0, 0.3, 1.0):
        mask = torch.rand(shape, generator=g) < density
        packed = PackedMask(mask)
        assert packed.bits.dtype == torch.uint8 and packed.bits.numel() == math.ceil(mask.numel() / 8)
        out = packed.unpack()
        assert out.dtype == torch.bool and out.shape == mask.shape and torch.equal(out, mask)
        assert packed.count_kept() == int(mask.sum())


@pytest.mark.parametrize("method,kw", [("magnitude", {}), ("wanda", {}), ("sparsegpt", {}), ("wanda", {"pattern": "2:4"}),
                                       ("sparsegpt", {"granularity": "row"})])
def test_prune_keeps_masks_packed_and_identical_to_the_zeros(tiny_llama, method, kw):
    """prune() stores masks one bit per weight; every read gives the bool keep-mask, equal to the real zeros,
    with the exact asked count; counting, saving and update read them without unpacking them for good."""
    masks = prune(tiny_llama.model, method, 0.5, calib=_ids(4, 32), **kw)
    lin = _linears(tiny_llama.model)
    assert all(masks.is_packed(n) for n in masks.names())
    numel = sum(lin[n].weight.numel() for n in masks.names())
    zeros = sum(int((lin[n].weight == 0).sum()) for n in masks.names())
    assert masks.sparsity() == pytest.approx(zeros / numel, abs=0)
    per_layer = masks.layer_sparsity()
    assert all(masks.is_packed(n) for n in masks.names())  # counting unpacked nothing for good
    copy = MaskSet()
    copy.update(masks)
    assert all(copy.is_packed(n) for n in copy.names())
    for n in masks.names():
        w = lin[n].weight
        assert per_layer[n] == pytest.approx(float((w == 0).float().mean()), abs=1e-12)
        m = masks[n]  # first read unpacks and keeps the bool tensor (what fine-tuning reads every step)
        assert m.dtype == torch.bool and m.shape == w.shape and torch.equal(m, w != 0)
        assert not masks.is_packed(n) and masks.masks.get(n) is m
        if method != "sparsegpt" and "pattern" not in kw:  # Wanda / magnitude: exactly floor(s * in) per row
            k = math.floor(0.5 * w.shape[1])
            assert ((~m).sum(1) == k).all(), n


def test_packed_masks_save_load_and_enforce_like_bool_masks(tmp_path, tiny_llama):
    masks = prune(tiny_llama.model, "wanda", 0.5, calib=_ids(4, 32))
    path = masks.save(tmp_path)
    assert all(masks.is_packed(n) for n in masks.names())  # saving unpacks one layer at a time, keeps nothing
    loaded = MaskSet.load(path)
    assert sorted(loaded.names()) == sorted(masks.names())
    assert all(torch.equal(loaded[n], masks.masks.peek(n)) for n in masks.names())
    lin = _linears(tiny_llama.model)
    with torch.no_grad():  # a training step revives pruned weights; enforcing the packed masks zeroes them again
        for n in masks.names():
            lin[n].weight.add_(1.0)
    masks.enforce(tiny_llama.model)
    assert all(torch.equal(lin[n].weight != 0, loaded[n]) for n in masks.names())
    assert sparsity_report(tiny_llama.model)["sparsity"] > 0.45
