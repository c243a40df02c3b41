"""VIB structured pruning and its baselines: Lagrangian target, μ fold, uniform widths, shrink + plain load."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from prunetune.errors import PrunetuneError
from prunetune.pruning.shrink.surgery import apply_masks
from prunetune.pruning.shrink.widths import Widths, allocate_widths, geometry, parse_structures, select
from prunetune.methods.shrink import prune_structured
from prunetune.methods.vib import GateBank, StructuredSpec, VibMethod, train_gates


def tiny(tie: bool = True, hidden: int = 32, inter: int = 256, heads: int = 8, kv: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tie,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def ids(n: int = 8, seqlen: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


# ------------------------------------------------------------------------------------------ gates, KL
def test_kl_is_vibnets_closed_form_and_pushes_noise_up():
    bank = GateBank((5,), -3.0, torch.Generator().manual_seed(0))
    mu, ls = bank.mu.detach(), bank.log_sigma2.detach()
    expected = 0.5 * torch.log(1 + mu**2 / ls.exp()).sum()
    assert torch.allclose(bank.kl(), expected, rtol=1e-5)
    bank.kl().backward()
    assert (bank.log_sigma2.grad < 0).all()  # descent raises log σ²: less information passes
    assert (bank.mu.grad > 0).all()  # and shrinks μ towards 0
    keep = bank.log_alpha() < 0
    assert keep.all()  # μ≈1, σ²=e^-3: signal above noise


def test_gates_sample_in_training_and_use_kept_mean_in_eval():
    bank = GateBank((3, 4), -2.0, torch.Generator().manual_seed(0))
    bank.train()
    a, b = bank.z(2, 1), bank.z(2, 1)
    assert a.shape == (2, 4) and not torch.equal(a, b)
    bank.eval()
    with torch.no_grad():
        bank.log_sigma2[1, 0] = 5.0  # noise dominates: removed
    z = bank.z(2, 1)
    assert z.shape == (1, 4) and z[0, 0] == 0 and torch.allclose(z[0, 1:], bank.mu[1, 1:])


def test_antithetic_noise_pairs_every_example_with_its_negation():
    bank = GateBank((3, 4), -2.0, torch.Generator().manual_seed(0))
    bank.train()
    bank.antithetic = True
    z = bank.z(4, 1).detach()
    mu = bank.mu[1].detach()
    assert torch.allclose(z[2:] - mu, -(z[:2] - mu)) and not torch.allclose(z[0], z[1])


def test_kd_teacher_pass_is_the_dense_model_and_its_loss_starts_near_zero():
    model = tiny()
    x = ids(4, 16)
    dense = logits(model, x)
    meth = VibMethod(StructuredSpec(sparsity=0.3, vib_steps=1, vib_batch=4, vib_loss="kd", init_log_sigma2=-12.0,
                                    vib_center=False))
    meth.prepare(model)
    meth.gates.train()
    meth.bypass = True  # the hooks pass through: what train_gates uses as the teacher
    assert torch.equal(logits(model, x), dense)
    meth.bypass = False
    assert not torch.equal(logits(model, x), dense)  # the gates act (μ ≈ 1 ± 1%, tiny noise)
    meth.remove_hooks()
    model = tiny()
    meth = VibMethod(StructuredSpec(sparsity=0.3, vib_steps=2, vib_batch=4, vib_loss="kd", init_log_sigma2=-12.0))
    train_gates(model, meth, x)
    lm = VibMethod(StructuredSpec(sparsity=0.3, vib_steps=2, vib_batch=4, vib_loss="lm", init_log_sigma2=-12.0))
    train_gates(tiny(), lm, x)
    # KL to the dense model of a model whose gates are ~1: ~0, while the LM loss is ~log(vocab)
    assert meth.history[0]["kd_loss"] < 1e-2 < 1.0 < lm.history[0]["lm_loss"]


def test_multipliers_ascend_and_gates_descend():
    model = tiny()
    meth = VibMethod(StructuredSpec(sparsity=0.5, vib_steps=1, lagrangian_warmup=0.0, vib_batch=2, vib_center=False))
    meth.prepare(model)
    loss, logs = meth.extra_loss(model, None, None)
    assert logs["target"] == 0.5 and logs["thresholded_sparsity"] == 0.0
    loss.backward()
    meth.after_step(model)
    # the constraint is violated (sparsity 0 < 0.5): ascent on λ₁(ŝ − t) makes λ₁ negative,
    # which makes removing parameters pay
    assert meth.lambdas[0].item() < 0
    assert all(not p.requires_grad for p in model.parameters())  # weights frozen while gates train


def test_nsgd_moves_each_gate_by_its_normalised_gradient_clipped_at_three_lr():
    from prunetune.methods.vib import NSGD_CLIP

    model = tiny()
    meth = VibMethod(StructuredSpec(sparsity=0.3, vib_steps=1, vib_batch=2, vib_lr=0.1, vib_center=False, vib_mu_lr=0.1,
                                    lagrangian_warmup=0.0), optimizer="nsgd")
    meth.prepare(model)
    bank = meth.gates.banks["neurons"]
    with torch.no_grad():
        bank.log_sigma2.zero_()  # float32 resolves the small steps near 0, not near the init (-9)
    before = bank.log_sigma2.detach().clone()
    grad = torch.full_like(before, 1e-3)
    grad[0, 0] = 1e3  # one spike: ~0.7 million RMS of the others
    bank.log_sigma2.grad = grad.clone()
    meth.after_step(model)
    step = before - bank.log_sigma2.detach()
    rms = grad.pow(2).mean().sqrt()
    assert torch.isclose(step[0, 0], torch.tensor(0.1 * NSGD_CLIP))  # clipped
    assert torch.allclose(step.flatten()[1:], 0.1 * grad.flatten()[1:] / rms)  # the rest: gradient / RMS
    assert torch.isfinite(bank.log_sigma2).all()


# --------------------------------------------------------------------------------------- Lagrangian
@pytest.mark.parametrize("structures", [("heads", "neurons"), ("neurons", "hidden")])
def test_lagrangian_brings_thresholded_sparsity_to_target(structures):
    model = tiny(hidden=64 if "hidden" in structures else 32)
    target = 0.4
    meth = VibMethod(StructuredSpec(sparsity=target, structures=structures, vib_steps=120, vib_batch=4, vib_lr=0.1,
                                    vib_lr_steps=120,
                                    vib_mu_lr=None, lagrangian_lr=0.1, lagrangian_warmup=0.3, init_log_sigma2=-4.0,
                                    vib_loss="lm", vib_widths="learned", vib_center=False))
    train_gates(model, meth, ids(16, 16))
    # what thresholding actually removes (structures with log σ² − log μ² ≥ 0), not the expected value
    removed = meth.summary()["thresholded_sparsity"]
    assert abs(removed - target) <= 0.01, meth.history[-5:]
    kept = meth.gates.hard()
    geom = meth.gates.geom
    frac = 1 - meth.gates.kept_fraction(kept, 1.0).item()
    assert frac == pytest.approx(removed)
    # check the count by hand: block parameters of the kept structures
    hid = kept["hidden"].sum().item() if "hidden" in kept else geom.hidden
    kvs = kept["heads"].sum(-1) if "heads" in kept else torch.full((geom.layers,), float(geom.kv_heads))
    neu = kept["neurons"].sum(-1)
    by_hand = sum(geom.attn_params(k.item(), hid) + geom.mlp_params(n.item(), hid) for k, n in zip(kvs, neu))
    assert 1 - by_hand / geom.block_params(geom.dense()) == pytest.approx(removed)


@pytest.mark.parametrize("step", ["adam", "gap"])
def test_per_layer_constraint_brings_every_layer_to_the_uniform_widths(step):
    """Either multiplier rule; the gap rule divides out each layer's weight (its share of block parameters), so
    its per-layer multipliers move at the global one's pace instead of ~1/layers of it."""
    model = tiny()
    target = 0.4
    spec = StructuredSpec(sparsity=target, structures=["heads", "neurons"], vib_steps=120, vib_batch=4, vib_lr=0.1,
                          vib_lr_steps=120,
                          vib_mu_lr=None, lagrangian_lr=0.1, lagrangian_warmup=0.3, init_log_sigma2=-4.0, vib_loss="lm",
                          vib_widths="uniform", vib_center=False, round_to=8, lagrangian_step=step)
    meth = train_gates(model, VibMethod(spec, constraint="per_layer"), ids(16, 16))
    geom = meth.gates.geom
    want = allocate_widths(geom, target, ("heads", "neurons"), 8)
    assert meth.lambdas.shape == (2 * geom.layers, 2)  # one pair per (kind, layer)
    kept = meth.gates.hard()
    # what thresholding removes in each layer, not the expected value: the widths the export keeps
    assert kept["heads"].sum(-1).tolist() == [want.kv] * geom.layers, meth.history[-3:]
    assert (kept["neurons"].sum(-1) - want.neurons).abs().max().item() <= 0.02 * geom.inter, kept["neurons"].sum(-1)
    removed = 1 - geom.block_params(want) / geom.block_params(geom.dense())
    assert meth.summary()["thresholded_sparsity"] == pytest.approx(removed, abs=0.01)


def test_per_layer_constraint_needs_uniform_widths():
    with pytest.raises(PrunetuneError, match="uniform"):
        VibMethod(StructuredSpec(vib_widths="learned"), constraint="per_layer")


@pytest.mark.parametrize("steps,lr_steps,factor", [(16, 16, 1.0), (64, 16, 0.25), (8, 16, 1.0), (64, None, 1.0)])
def test_gate_lr_shrinks_with_the_budget(steps, lr_steps, factor):
    """vib_lr_steps: a run longer than the lrs were set for takes proportionally smaller steps (the gates travel as
    far in all); a shorter one keeps the lr; None keeps it at any budget. Both gate groups (log σ², μ) scale."""
    model = tiny()
    meth = VibMethod(StructuredSpec(sparsity=0.3, vib_steps=steps, vib_lr=0.2, vib_mu_lr=0.04, vib_lr_steps=lr_steps,
                                    vib_center=False))
    meth.prepare(model)
    for group in meth._opt.param_groups:
        group["params"][0].grad = torch.zeros_like(group["params"][0])
    meth.after_step(model)
    assert [g["lr"] for g in meth._opt.param_groups] == pytest.approx([0.2 * factor, 0.04 * factor])
    assert meth.record()["lr_steps"] == lr_steps


def test_target_ramps_over_the_warmup_fraction():
    meth = VibMethod(StructuredSpec(sparsity=0.3, vib_steps=100, lagrangian_warmup=0.5))
    assert meth.target_at(0) == 0 and meth.target_at(25) == pytest.approx(0.15) and meth.target_at(80) == 0.3


# --------------------------------------------------------------------------------------------- fold
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("structures", [("heads", "neurons"), ("heads", "neurons", "hidden")])
@pytest.mark.parametrize("center", [False, True])
def test_folding_mu_keeps_the_gated_models_eval_outputs(tie, structures, center):
    from prunetune.pruning.shrink.scores import collect_moments

    model = tiny(tie=tie)
    meth = VibMethod(StructuredSpec(sparsity=0.3, structures=structures, vib_steps=6, vib_batch=2, vib_lr=0.3,
                                    round_to=8, vib_center=center))
    if center:
        meth.set_means(model, collect_moments(model, ids()))
        assert meth.means["neurons"].abs().sum() > 0
    train_gates(model, meth, ids())
    assert not torch.allclose(meth.gates.banks["neurons"].mu, torch.ones(1))  # μ moved: the fold is not trivial
    geom = geometry(model)
    sel = select(meth.scores(), meth.widths(geom), geom)
    meth.set_eval_keep(sel)  # gated model in eval mode: z = μ on the kept structures, 0 elsewhere
    x = ids(2, 16, seed=5)
    gated = logits(model, x)
    meth.fold(model, sel)
    apply_masks(model, sel)
    assert not meth._hooks
    assert (logits(model, x) - gated).abs().max().item() <= 1e-5
    assert (model.model.layers[0].mlp.down_proj.bias is not None) == center  # centred: the means became biases


# ---------------------------------------------------------------------------------- shrink and load
@pytest.mark.parametrize("method", ["vib", "vib+comp", "vib+center", "l1", "l2", "wanda", "flap"])
def test_shrink_equals_masked_and_loads_in_plain_transformers(method, tmp_path):
    base = tiny(tie=True)
    comp, center = method == "vib+comp", method == "vib+center"
    method = method.partition("+")[0]
    kw = dict(structures="heads,neurons", round_to=16, ids=ids(),
              vib=StructuredSpec(vib_steps=4, vib_batch=2, vib_center=center,
                                 vib_loss="kd" if comp or center else "lm"), vib_options={"compensate": comp})
    masked, fm = prune_structured(copy.deepcopy(base), method, 0.3, shrink=False, **kw)
    shrunk, fs = prune_structured(copy.deepcopy(base), method, 0.3, shrink=True, **kw)
    assert fm["widths"] == fs["widths"]
    x = ids(2, 16, seed=7)
    assert (logits(masked, x) - logits(shrunk, x)).abs().max().item() <= 1e-5
    w = fs["widths"]
    cfg = shrunk.config
    assert (cfg.num_key_value_heads, cfg.intermediate_size) == (w["kv"], w["neurons"])
    assert cfg.num_attention_heads == w["kv"] * 2  # GQA groups stay whole (2 query heads per KV head)
    assert w["neurons"] % 16 == 0
    layer = shrunk.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size)
    assert layer.self_attn.k_proj.weight.shape == (cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size)
    assert layer.mlp.down_proj.weight.shape == (cfg.hidden_size, cfg.intermediate_size)
    assert fs["block_sparsity"] == pytest.approx(0.3, abs=0.05)
    shrunk.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no prunetune, no remote code
    assert (logits(plain, x) - logits(shrunk, x)).abs().max().item() <= 1e-6
    if method == "flap" or comp or center:  # bias compensation rides on stock config flags
        assert plain.config.mlp_bias and plain.config.attention_bias
        assert plain.model.layers[0].mlp.down_proj.bias.abs().sum() > 0


def _kept(model) -> tuple[list, list]:
    """KV groups and neurons a masked (shrink=False) tiny model keeps: its nonzero o_proj / down_proj columns."""
    heads, neurons = [], []
    for layer in model.model.layers:
        o = layer.self_attn.o_proj.weight.abs().sum(0).view(4, -1).sum(1)  # 4 KV groups x (2 heads x head_dim)
        heads.append((o > 0).nonzero().flatten().tolist())
        neurons.append((layer.mlp.down_proj.weight.abs().sum(0) > 0).nonzero().flatten().tolist())
    return heads, neurons


def test_flap_neuron_ranking_takes_kv_groups_from_the_gates_and_neurons_from_flap():
    base, x = tiny(), ids()
    vib = StructuredSpec(vib_steps=6, vib_batch=2, vib_center=True, vib_widths="uniform", vib_loss="kd",
                         lagrangian_lr=10.0, vib_neuron_ranking="vib")
    kw = dict(structures="heads,neurons", round_to=16, ids=x, shrink=False)
    gates: dict = {}
    own, _ = prune_structured(copy.deepcopy(base), "vib", 0.5, vib=vib, gates_out=gates, **kw)
    hybrid, facts = prune_structured(copy.deepcopy(base), "vib", 0.5, gate_state=gates, **kw,
                                     vib=vib.model_copy(update={"vib_neuron_ranking": "flap"}))
    flap, _ = prune_structured(copy.deepcopy(base), "flap", 0.5, **kw)
    (h_own, n_own), (h_hyb, n_hyb), (_, n_flap) = _kept(own), _kept(hybrid), _kept(flap)
    assert h_hyb == h_own and n_hyb == n_flap  # the same trained gates, FLAP's neurons
    assert n_own != n_flap  # the two rankings differ here, so the check above can fail
    assert facts["vib"]["config"]["neuron_ranking"] == "flap"
    with pytest.raises(PrunetuneError, match="center"):
        VibMethod(StructuredSpec(vib_neuron_ranking="flap", vib_center=False))


def test_hidden_dimension_shrink_within_1e_3_with_rmsnorm_rescale(tmp_path):
    base = tiny(tie=True, hidden=64)
    kw = dict(structures="heads,neurons,hidden", round_to=16, ids=ids())
    masked, _ = prune_structured(copy.deepcopy(base), "wanda", 0.4, shrink=False, **kw)
    shrunk, facts = prune_structured(copy.deepcopy(base), "wanda", 0.4, shrink=True, **kw)
    assert facts["widths"]["hidden"] < 64 and facts["widths"]["hidden"] % 16 == 0
    assert shrunk.config.hidden_size % shrunk.config.num_attention_heads == 0  # transformers requires it
    x = ids(2, 16, seed=3)
    assert (logits(masked, x) - logits(shrunk, x)).abs().max().item() <= 1e-3
    shrunk.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert plain.get_input_embeddings().weight.shape[1] == facts["widths"]["hidden"]
    assert (logits(plain, x) - logits(shrunk, x)).abs().max().item() <= 1e-6
    assert facts["compute_ratio"] > 1 / (1 - facts["block_sparsity"]) * 0.9  # the LM head shrank too


# ------------------------------------------------------------------------------------------ widths
@pytest.mark.parametrize("sparsity", [0.2, 0.3, 0.5])
def test_uniform_widths_hit_the_target_within_a_rounding_step(sparsity):
    geom = geometry(tiny(hidden=64, inter=512))
    w = allocate_widths(geom, sparsity, ("heads", "neurons"), 16)
    step = geom.layers * geom.mlp_params(16, geom.hidden) / geom.block_params(geom.dense())
    achieved = 1 - geom.block_params(w) / geom.block_params(geom.dense())
    assert abs(achieved - sparsity) <= step / 2 + 1e-9
    assert w.neurons % 16 == 0 and 1 <= w.kv <= geom.kv_heads


def test_smollm2_compute_ratio_counts_the_tied_lm_head():
    from prunetune.pruning.shrink.widths import Geometry

    from prunetune.models.arch import AttentionGeometry

    g = Geometry(AttentionGeometry(num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576), layers=30, inter=1536,
                 vocab=49152)
    assert g.vocab * g.hidden / (g.block_params(g.dense()) + g.vocab * g.hidden) == pytest.approx(0.21, abs=0.01)
    w = allocate_widths(g, 0.5, ("heads", "neurons"), 64)
    removed = 1 - g.flops_per_token(w) / g.flops_per_token(g.dense())
    assert removed == pytest.approx(0.395, abs=0.02)  # 50% of block params is only ~40% of per-token FLOPs
    wh = allocate_widths(g, 0.5, ("heads", "neurons", "hidden"), 64)
    assert wh.hidden % (wh.kv * g.groups) == 0 and wh.hidden % 64 == 0


def test_selection_keeps_the_top_scores_per_layer():
    geom = geometry(tiny())
    scores = {"neurons": torch.arange(2 * 256, dtype=torch.float).view(2, 256).flip(-1)}
    sel = select(scores, Widths(4, 64, 32), geom)
    assert torch.equal(sel.neurons[0], torch.arange(64)) and sel.kv.shape == (2, 4) and sel.hidden.numel() == 32


# ------------------------------------------------------------------------------------------ errors
def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


def test_sparsity_that_would_remove_every_head_is_one_line_error():
    with pytest.raises(PrunetuneError) as exc:
        prune_structured(tiny(), "l2", 0.5, structures="heads", shrink=False)
    assert "every KV group" in _one_line(exc)


def test_rounding_larger_than_a_dimension_is_one_line_error():
    with pytest.raises(PrunetuneError) as exc:
        prune_structured(tiny(), "l2", 0.3, structures="heads,neurons", round_to=512, shrink=False)
    assert "larger than the neurons dimension" in _one_line(exc)


def test_family_without_hidden_coupling_is_one_line_error():
    from prunetune.models.loading import load_model

    bert = load_model("tiny-bert", "masked-lm").model
    with pytest.raises(PrunetuneError) as exc:
        prune_structured(bert, "l2", 0.3, structures="heads,neurons,hidden", shrink=False)
    assert "Llama" in _one_line(exc)


@pytest.mark.parametrize("bad", [dict(sparsity=1.0), dict(vib_lr=0), dict(lagrangian_warmup=2.0),
                                 dict(structures=["heads", "layers"]), dict(vib_steps=0)])
def test_bad_vib_options_are_refused_by_the_schema(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        StructuredSpec(**bad)


@pytest.mark.parametrize("bad", [dict(compensate=True), dict(lr_decay=2.0), dict(optimizer="sgd"), dict(beta=0.0)])
def test_bad_vib_method_options_are_one_line_errors(bad):
    with pytest.raises(PrunetuneError) as exc:
        VibMethod(StructuredSpec(vib_center=True), **bad)
    _one_line(exc)


def test_unknown_structure_and_method():
    with pytest.raises(PrunetuneError):
        parse_structures("heads,rows")
    with pytest.raises(PrunetuneError) as exc:
        prune_structured(tiny(), "taylor", 0.3, shrink=False)
    assert "vib" in _one_line(exc)
    with pytest.raises(PrunetuneError):
        prune_structured(tiny(), "wanda", 0.3, shrink=False)  # needs calibration text


# ------------------------------------------------------------------------------ through tuning.finetune
def test_finetune_drives_vib_gates_and_exports_a_shrunk_model(tmp_path):
    """`finetune(..., method=VibMethod(...))`: the trainer's steps train the gates (weights frozen), the
    Lagrangian reaches the target, and finalize folds μ and shrinks, so the export is the smaller model."""
    from prunetune.data.spec import DataSpec
    from prunetune.models.loading import load_model
    from prunetune.tuning.finetune import finetune
    from prunetune.tuning.spec import TuneSpec

    dense = load_model("tiny-llama", "causal-lm").model
    lm = {"task": "causal-lm", "data": DataSpec(train="wikitext2")}
    cfg = TuneSpec(mode="full", steps=None, n_samples=16, eval_samples=2, test_samples=4, epochs=1, batch_size=2,
                   seqlen=32, retention=False, kd=False)
    meth = VibMethod(StructuredSpec(sparsity=0.3, structures=["heads", "neurons"], round_to=16, vib_lr=0.1,
                                    vib_mu_lr=None, lagrangian_lr=0.1, init_log_sigma2=-2.0, vib_center=False))
    r = finetune("tiny-llama", cfg, tmp_path / "vib", **lm, method=meth)
    assert r["method"] == "vib" and meth.step == r["global_step"] == 8  # one gate step per trainer step
    assert abs(r["thresholded_sparsity"] - 0.3) < 0.05  # the multipliers pulled the kept count to the target
    assert r["mu"]["neurons"]["min"] != r["mu"]["neurons"]["max"]  # the gates moved
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "vib" / "model")  # stock transformers loads it
    c = plain.config
    assert c.intermediate_size < dense.config.intermediate_size and c.intermediate_size % 16 == 0
    assert c.num_attention_heads == c.num_key_value_heads * 2  # GQA groups whole
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in dense.parameters())
    dense_p = dict(dense.named_parameters())
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(dict(plain.named_parameters())[name], dense_p[name])  # weights frozen, no hidden gates
    lora = TuneSpec(mode="lora", steps=None, n_samples=4, eval_samples=2, test_samples=4, epochs=1, batch_size=2,
                    seqlen=32, retention=False, kd=False)
    with pytest.raises(PrunetuneError) as exc:  # LoRA would be frozen with the base weights: refused
        finetune("tiny-llama", lora, tmp_path / "lora", **lm, method=VibMethod(StructuredSpec(sparsity=0.3)))
    assert "without LoRA" in _one_line(exc)


def test_centred_gates_need_the_calibration_means_and_leave_a_removed_structure_at_its_mean():
    from prunetune.pruning.shrink.scores import collect_moments

    with pytest.raises(PrunetuneError) as exc:
        VibMethod(StructuredSpec(vib_center=True)).prepare(tiny())
    assert "set_means" in _one_line(exc)
    model = tiny()
    meth = VibMethod(StructuredSpec(vib_center=True, structures=["neurons"]))
    stats = collect_moments(model, ids())
    meth.set_means(model, stats)
    meth.prepare(model)
    meth.gates.eval()
    with torch.no_grad():
        meth.gates.banks["neurons"].log_sigma2[0] = 20.0  # every neuron of layer 0 removed
    seen = {}
    down = model.model.layers[0].mlp.down_proj
    h = down.register_forward_hook(lambda _m, a, _o: seen.update(x=a[0].detach()))
    logits(model, ids(1, 8, seed=3))
    h.remove()
    mean = stats["model.layers.0.mlp.down_proj"].mean().float()
    assert torch.allclose(seen["x"], mean.expand_as(seen["x"]), atol=1e-6)  # down_proj sees the mean, not 0


def test_vib_takes_the_recipe_schema_itself_and_records_the_settings_under_their_result_names():
    """One schema: `VibMethod` takes the recipe's `structured` section (no VibConfig twin, no converter), and
    what a result records (`summary()["config"]`) keeps the names results have always had."""
    import prunetune.methods.vib as vib

    assert not hasattr(vib, "VibConfig")
    spec = StructuredSpec(sparsity=0.4, vib_steps=3, vib_batch=5, vib_mu_lr=None, vib_loss="lm", vib_widths="learned",
                          vib_center=False, structures=["neurons", "heads"])
    rec = VibMethod(spec, seed=7, optimizer="nsgd").summary()["config"]
    assert rec == {"target_sparsity": 0.4, "vib_lr": spec.vib_lr, "mu_lr": None, "lr_steps": 16,
                   "lagrangian_lr": spec.lagrangian_lr,
                   "lagrangian_step": spec.lagrangian_step, "lagrangian_warmup": spec.lagrangian_warmup, "att_mul": spec.att_mul, "kl_factor": spec.kl_factor,
                   "beta": 1.0, "straight_through": True, "structures": ["heads", "neurons"], "round_to": 64,
                   "steps": 3, "batch_size": 5, "init_log_sigma2": spec.init_log_sigma2, "antithetic": False,
                   "optimizer": "nsgd", "widths": "learned", "compensate": False, "center": False, "lr_decay": 1.0,
                   "constraint": "global", "neuron_ranking": "vib", "loss": "lm", "split": "equal", "seed": 7}
    vib_fields = {f for f in StructuredSpec.model_fields if f.startswith("vib_")} | {
        "lagrangian_lr", "lagrangian_step", "split", "lagrangian_warmup", "att_mul", "kl_factor", "init_log_sigma2", "sparsity", "structures",
        "round_to"}
    assert vib_fields == set(StructuredSpec.model_fields) - {"method", "nsamples", "seqlen"}  # all recorded above


# ------------------------------------------------------------------------------- split between kinds
def test_split_candidates_are_every_kv_count_at_the_same_budget():
    from prunetune.pruning.shrink.widths import split_candidates

    geom = geometry(tiny(hidden=64, inter=256, heads=8, kv=4))
    for sparsity in (0.2, 0.3, 0.5):
        equal = allocate_widths(geom, sparsity, ("heads", "neurons"), 16)
        cands = split_candidates(geom, sparsity, ("heads", "neurons"), 16)
        unit = geom.layers * geom.mlp_params(16, geom.hidden)
        assert equal in cands and len({c.kv for c in cands}) == len(cands)
        for c in cands:
            assert abs(geom.block_params(c) - geom.block_params(equal)) <= unit
            assert c.neurons % 16 == 0 and c.neurons <= geom.inter and c.hidden == geom.hidden
        assert [c.kv for c in cands] == sorted((c.kv for c in cands), reverse=True)
    assert max(c.kv for c in split_candidates(geom, 0.2, ("heads", "neurons"), 16)) == 4  # all KV groups kept
    assert split_candidates(geom, 0.3, ("neurons",), 16) == [allocate_widths(geom, 0.3, ("neurons",), 16)]


@pytest.mark.parametrize("method", ["flap", "wanda", "vib"])
def test_measured_split_keeps_the_candidate_with_the_lowest_calibration_loss(method):
    from prunetune.methods.shrink import calibration_loss

    model, x = tiny(hidden=64, inter=256, heads=8, kv=4), ids(8, 16)
    spec = StructuredSpec(split="measured", vib_steps=3, vib_batch=2)
    out, facts = prune_structured(model, method, 0.3, round_to=16, ids=x, vib=spec)
    tried = facts["split"]["tried"]
    assert len(tried) >= 2 and facts["split"]["rule"] == "measured"
    best = min(tried, key=lambda t: t["loss"])
    assert facts["split"]["chosen"] == best["widths"] == facts["widths"]
    # the shrunk model is the candidate that was scored: same calibration loss
    assert calibration_loss(out, x[:8]) == pytest.approx(best["loss"], rel=1e-4)
    if method == "vib":
        assert "kept" in facts["vib"]


def test_measured_split_is_refused_with_learned_widths_and_with_compensation():
    with pytest.raises(PrunetuneError, match="choose one"):
        VibMethod(StructuredSpec(split="measured", vib_widths="learned"))
    with pytest.raises(PrunetuneError, match="center"):
        VibMethod(StructuredSpec(split="measured", vib_center=False), compensate=True)


def test_gap_step_moves_the_multipliers_by_the_gap_and_never_pushes_past_the_target():
    """lagrangian_step "gap": λ += lr·(gap, gap²)/sparsity (Adam would move λ by lr whatever the gap), λ₁ is reset
    where it would push away from the target, and the gates' Adam has no momentum."""
    model = tiny()
    spec = StructuredSpec(sparsity=0.5, vib_steps=4, lagrangian_warmup=0.0, vib_batch=2, vib_center=False,
                          lagrangian_lr=10.0, lagrangian_step="gap")
    meth = VibMethod(spec)
    meth.prepare(model)
    assert all(g["betas"][0] == 0.0 for g in meth._opt.param_groups)
    loss, logs = meth.extra_loss(model, None, None)
    gap = logs["thresholded_sparsity"] - 0.5  # -0.5: nothing removed yet
    loss.backward()
    meth.after_step(model)
    assert meth.lambdas[0].item() == pytest.approx(10.0 * gap / 0.5)  # -10 at a gap of the whole target
    assert meth.lambdas[1].item() == pytest.approx(10.0 * gap * gap / 0.5)
    # past the target: a negative λ₁ would keep pushing more structures out; it is reset to 0
    with torch.no_grad():
        for b in meth.gates.banks.values():
            b.log_sigma2.fill_(5.0)  # every gate past the threshold: sparsity 1 > 0.5
    loss, logs = meth.extra_loss(model, None, None)
    assert logs["thresholded_sparsity"] == 1.0
    loss.backward()
    meth.after_step(model)
    assert meth.lambdas[0].item() == 0.0 and meth.lambdas[1].item() > 0
    half = VibMethod(StructuredSpec(sparsity=0.5, vib_steps=4, lagrangian_warmup=0.0, vib_batch=2, vib_center=False))
    half.prepare(tiny())
    assert all(g["betas"][0] == 0.9 for g in half._opt.param_groups)  # "adam" (the default) keeps TVA-Prune's


def test_default_neuron_ranking_is_the_hybrid_with_centred_gates():
    """Issue 29 item 10: the default is what measured best at 20/30/50% on SmolLM2 (the gates' KV groups, FLAP's
    neurons: 51.72 / 73.11 / 138.67 against FLAP's 73.13 / 89.52 / 180.32 at 64 windows); without centred gates
    (FLAP's removal) the neurons stay the gates'."""
    assert StructuredSpec().vib_neuron_ranking == "auto" and StructuredSpec().neuron_ranking() == "flap"
    assert StructuredSpec(vib_center=False).neuron_ranking() == "vib"
    assert StructuredSpec(vib_neuron_ranking="vib").neuron_ranking() == "vib"
    model, x = tiny(), ids()
    _, facts = prune_structured(model, "vib", 0.3, round_to=8, ids=x, vib=StructuredSpec(vib_steps=2))
    assert facts["vib"]["config"]["neuron_ranking"] == "flap"
    VibMethod(StructuredSpec(vib_neuron_ranking="flap", vib_widths="learned"))  # any widths now
