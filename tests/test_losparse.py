"""LoSparse: SVD init is the truncated SVD, PLATON scores by hand, the cubic schedule, masks fixed to the
export, both exports reload with the trained model's predictions, one-line errors.

The lifecycle is driven by `_train`, a minimal loop calling the hooks in the documented order (prepare,
extra_loss, backward, optimizer.step, after_step, zero_grad, finalize), so these tests do not depend on
the Trainer integration.
"""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError
import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.methods.base import MethodContext
from prunetune.methods.losparse import (
    Losparse,
    LosparseSchedule,
    LosparseSpec,
    LowRankSparseLinear,
    PlatonScores,
    losparse_layers,
    parameter_counts,
    rank_for,
    select_keep,
)
from prunetune.models.loading import load_model

TEXTS = ["the market fell sharply today", "a late goal won the match", "new phone unveiled at the show",
         "parliament votes on the budget", "shares rose after results", "the striker signed a new deal",
         "chip maker releases faster processor", "minister resigns over the report"]
LABELS = [0, 1, 2, 3, 0, 1, 2, 3]


def _batches(tok, n_steps: int, bs: int = 4):
    out = []
    for s in range(n_steps):
        idx = [(s * bs + i) % len(TEXTS) for i in range(bs)]
        enc = tok([TEXTS[i] for i in idx], padding=True, return_tensors="pt")
        enc["labels"] = torch.tensor([LABELS[i] for i in idx])
        out.append(dict(enc))
    return out


def _train(model: nn.Module, method: Losparse, ctx: MethodContext, batches: list[dict], lr: float = 1e-2) -> nn.Module:
    """The documented hook order, by hand."""
    model = method.prepare(model, ctx)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for batch in batches:
        out = model(**batch)
        extra, _ = method.extra_loss(model, batch, out, ctx)
        loss = out.loss + (extra if extra is not None else 0.0)
        loss.backward()
        opt.step()
        ctx.step += 1
        method.after_step(model, ctx)
        if len(ctx.masks):
            ctx.masks.apply(model)  # what the driver's mask enforcement does
        opt.zero_grad()
    return method.finalize(model, ctx)


def _tiny_cls():
    loaded = load_model("tiny-bert", "seq-cls", num_labels=4)
    return loaded.model, loaded.tokenizer


@torch.no_grad()
def _logits(model, tok) -> torch.Tensor:
    model.eval()
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    return model(**enc).logits


# ------------------------------------------------------------------------------------------------ module
@pytest.mark.parametrize("shape,ratio", [((48, 64), 0.1), ((64, 128), 0.25), ((96, 32), 0.4)])
def test_svd_init_is_the_truncated_svd(shape, ratio):
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0])
    m, n = shape
    r = rank_for(m, n, ratio)
    assert r == math.ceil(ratio * m * n / (m + n))
    mod = LowRankSparseLinear.from_linear(lin, r)
    W = lin.weight.detach().double()
    sv = torch.linalg.svdvals(W)
    UV = (mod.U @ mod.V).detach().double()
    # Eckart–Young: the residual of the best rank-r approximation is the tail of the spectrum
    assert torch.linalg.matrix_norm(W - UV) ** 2 == pytest.approx(float((sv[r:] ** 2).sum()), rel=1e-5)
    assert torch.linalg.matrix_rank(UV, rtol=1e-6) == r
    # U = U_r sqrt(S_r), V = sqrt(S_r) V_r^T: both factors carry the same singular values
    assert torch.allclose(torch.linalg.svdvals(mod.U.detach().double()), sv[:r].sqrt(), rtol=1e-5)
    assert torch.allclose(torch.linalg.svdvals(mod.V.detach().double()), sv[:r].sqrt(), rtol=1e-5)
    assert torch.allclose(UV + mod.weight.detach().double(), W, atol=1e-6)
    x = torch.randn(5, n)
    assert torch.allclose(mod(x), lin(x), atol=1e-5)
    assert torch.allclose(mod.to_linear()(x), lin(x), atol=1e-5)


def test_lora_model_is_refused():
    from prunetune.tuning.lora import apply_lora

    model, _ = _tiny_cls()
    peft = apply_lora(model, "seq-cls", rank=2, alpha=4)
    with pytest.raises(PrunetuneError, match="without LoRA"):
        Losparse(LosparseSpec(initial_warmup_steps=1, final_warmup_steps=1)).prepare(peft, MethodContext(max_steps=6))


def test_targets_and_parameter_counts():
    model, _ = _tiny_cls()
    dense = {n: p.numel() for n, p in model.named_parameters()}
    from prunetune.methods.losparse import factorize

    info = factorize(model, 0.2)
    names = set(info)
    assert names and all(".attention." in n or ".intermediate." in n or ".output." in n for n in names)
    assert not any(k in n for n in names for k in ("embeddings", "pooler", "classifier", "LayerNorm"))
    assert isinstance(model.classifier, nn.Linear) and isinstance(model.bert.pooler.dense, nn.Linear)
    lin_dense = sum(dense[f"{n}.weight"] for n in names)
    lowrank = sum(r["rank"] * (r["shape"][0] + r["shape"][1]) for r in info.values())
    for name, lay in losparse_layers(model).items():
        lay.weight.data[:, ::2] = 0  # half of S pruned
    c = parameter_counts(model)
    assert c["linear_dense"] == lin_dense and c["lowrank"] == lowrank
    assert c["sparse_kept"] == lin_dense // 2
    assert c["linear_kept"] == lowrank + lin_dense // 2
    assert c["linear_kept_fraction"] == pytest.approx((lowrank + lin_dense // 2) / lin_dense)
    assert c["model_params_dense_equivalent"] == sum(dense.values())


# ------------------------------------------------------------------------------------------------ PLATON
def test_platon_scores_match_hand_computation():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(3, 4))
    scores = PlatonScores(beta1=0.8, beta2=0.7)
    avg = torch.zeros(3, 4)
    unc = torch.zeros(3, 4)
    for _ in range(3):
        p.grad = torch.randn(3, 4)
        scores.update({"w": p})
        ipt = (p.detach() * p.grad).abs()
        avg = 0.8 * avg + 0.2 * ipt
        unc = 0.7 * unc + 0.3 * (ipt - avg).abs()
        with torch.no_grad():
            p.add_(0.1)
    assert torch.allclose(scores.score("w"), avg * unc, atol=1e-7)
    # one element by hand, first step: Ī = 0.2 I, Ū = 0.3 |I − 0.2 I| = 0.24 I, score 0.048 I²
    q = nn.Parameter(torch.tensor([[2.0, -1.0]]))
    q.grad = torch.tensor([[0.5, 3.0]])
    s = PlatonScores(0.8, 0.7)
    s.update({"q": q})
    assert torch.allclose(s.score("q"), torch.tensor([[0.048 * 1.0, 0.048 * 9.0]]))


def test_platon_window_folds_the_window_mean_once_per_window():
    """PLATON's rule (deltaT = 3): Ī and Ū change only at steps 3, 6, ..., each time folding in the mean I of the
    window's three steps; in between they hold still and the window's sum grows."""
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(2, 5))
    scores = PlatonScores(beta1=0.8, beta2=0.7, window=3)
    avg, unc, window = torch.zeros(2, 5), torch.zeros(2, 5), []
    for t in range(1, 8):
        p.grad = torch.randn(2, 5)
        before = (scores.avg["w"].clone(), scores.unc["w"].clone()) if "w" in scores.avg else None
        folded = scores.update({"w": p})
        window.append((p.detach() * p.grad).abs())
        assert folded == (t % 3 == 0) and scores.folds == t // 3 and scores.pending == t % 3
        if t % 3 == 0:
            mean = torch.stack(window).mean(0)
            avg = 0.8 * avg + 0.2 * mean
            unc = 0.7 * unc + 0.3 * (mean - avg).abs()
            window = []
        elif before is not None:  # no fold: the averages are exactly as they were
            assert torch.equal(scores.avg["w"], before[0]) and torch.equal(scores.unc["w"], before[1])
        assert torch.allclose(scores.avg["w"], avg, atol=1e-7) and torch.allclose(scores.unc["w"], unc, atol=1e-7)
        with torch.no_grad():
            p.add_(0.1)
    assert torch.allclose(scores.acc["w"], window[0], atol=1e-7)  # step 7 opened the third window
    assert torch.allclose(scores.score("w"), avg * unc, atol=1e-7)
    # numbers: one entry, I = 1, 2, 3 over the window: mean 2 -> Ī = 0.2*2 = 0.4, Ū = 0.3*|2 - 0.4| = 0.48
    q = nn.Parameter(torch.tensor([[1.0]]))
    s = PlatonScores(0.8, 0.7, window=3)
    for i in (1.0, 2.0, 3.0):
        q.grad = torch.tensor([[i]])
        s.update({"q": q})
    assert s.avg["q"].item() == pytest.approx(0.4) and s.unc["q"].item() == pytest.approx(0.48)
    assert s.score("q").item() == pytest.approx(0.192)
    # per step (window 1): Ī after I = 1, 2, 3 is 0.8*(0.8*0.2*1 + 0.2*2) + 0.2*3 = 1.048
    s1 = PlatonScores(0.8, 0.7, window=1)
    for i in (1.0, 2.0, 3.0):
        q.grad = torch.tensor([[i]])
        s1.update({"q": q})
    assert s1.avg["q"].item() == pytest.approx(1.048) and s1.folds == 3


def test_platon_beta2_one_is_the_sensitivity_alone():
    """β2 = 1 (the LoSparse code's default) switches the uncertainty off: the score is Ī itself."""
    q = nn.Parameter(torch.tensor([[2.0, -1.0]]))
    q.grad = torch.tensor([[0.5, 3.0]])  # I = 1, 3
    s = PlatonScores(0.8, 1.0)
    s.update({"q": q})
    assert torch.allclose(s.score("q"), torch.tensor([[0.2, 0.6]]))  # Ī = 0.2 I, no uncertainty factor
    assert torch.equal(s.unc["q"], torch.zeros(1, 2))
    assert LosparseSpec(beta2=1.0).beta2 == 1.0
    method = Losparse(LosparseSpec(beta2=1.0, deltaT=4))
    assert (method.scores.beta2, method.scores.window) == (1.0, 4)
    with pytest.raises(ValidationError, match="platon_ema"):  # the per-step rule measured the same: not kept
        LosparseSpec(platon_ema="step")
    with pytest.raises(ValidationError, match="beta2"):
        LosparseSpec(beta2=1.01)
    with pytest.raises(PrunetuneError, match="beta2"):
        PlatonScores(0.8, 1.5)


def test_select_keep_unstructured_and_structured():
    torch.manual_seed(0)
    sc = {"a": torch.rand(6, 10), "b": torch.rand(4, 10)}
    m = select_keep(sc, 0.3)
    assert sum(int(v.sum()) for v in m.values()) == 30
    thr = torch.cat([v.flatten() for v in sc.values()]).sort(descending=True).values[29]
    assert all(bool((sc[k][m[k]] >= thr).all()) for k in sc)
    rows = select_keep(sc, 0.3, "mean", {"a": "row", "b": "col"})
    # every row of a / column of b is all kept or all dropped
    assert all(bool(((r.all(1)) | (~r.any(1))).all()) for r in [rows["a"]])
    assert bool(((rows["b"].all(0)) | (~rows["b"].any(0))).all())
    kept = sum(int(v.sum()) for v in rows.values())
    assert 30 - 10 < kept <= 30


# ------------------------------------------------------------------------------------------------ schedule
def test_schedule_is_cubic_and_reaches_final_threshold_exactly():
    s = LosparseSpec(rank_ratio=0.1, keep=0.15, warmup_steps=4, initial_warmup=1, final_warmup=2, deltaT=3)
    sch = s.schedule(40)
    assert (sch.initial_warmup_steps, sch.final_warmup_steps, sch.fix_step) == (4, 8, 33)
    assert sch.at(4) == (1.0, False)
    keeps = [sch.at(t)[0] for t in range(5, 33)]
    assert all(a > b for a, b in zip(keeps, keeps[1:]))
    assert sch.at(10)[0] == pytest.approx(0.15 + 0.85 * (1 - 6 / 28) ** 3)
    assert [t for t in range(1, 41) if sch.at(t)[1]] == [6, 9, 12, 15, 18, 21, 24, 27, 30, 33]
    assert sch.at(33) == (0.15, True) and sch.at(40) == (0.15, False)
    plain = LosparseSpec(keep=0.15, initial_warmup_steps=5, final_warmup_steps=7).schedule(40)
    assert (plain.initial_warmup_steps, plain.final_warmup_steps) == (5, 7)


@pytest.mark.parametrize("structured,final_mask", [(None, "fixed"), ("mean", "fixed"), (None, "recompute"),
                                                   ("mean", "recompute")])
def test_training_prunes_s_and_mask_is_fixed_through_exports(tmp_path, structured, final_mask):
    """12 steps, deltaT 2, final warm-up 4 steps (from t = 9). `fixed`: the mask computed at t = 9 holds to the
    end. `recompute` (the method's rule, the default): the scores keep folding (t = 10, 12) and the mask is
    recomputed at 9, 10 and 12, each at exactly the final kept fraction; the last one is what is exported."""
    model, tok = _tiny_cls()
    spec = LosparseSpec(rank_ratio=0.2, keep=0.25, initial_warmup_steps=2, final_warmup_steps=4, deltaT=2,
                        structured_method=structured, structured_direction="row_col", final_mask=final_mask)
    method = Losparse(spec)
    ctx = MethodContext(max_steps=12, tokenizer=tok)
    seen: list[dict] = []
    orig_after = method.after_step

    def spy(model, ctx):
        orig_after(model, ctx)
        seen.append({n: (m.weight != 0).clone() for n, m in method.layers.items()})

    method.after_step = spy
    ctx.out = tmp_path / "run"
    plain = _train(model, method, ctx, _batches(tok, 12))  # finalize: factorised export, then materialised
    assert method.fixed is not None and set(method.fixed.names()) == set(method.layers)
    assert not any(n in ctx.masks for n in method.layers), "S-masks must not be applied to the dense W'"
    total = sum(m.weight.numel() for m in method.layers.values())
    nz = sum(int(torch.count_nonzero(m.weight)) for m in method.layers.values())
    if structured is None:
        assert nz == round(0.25 * total)  # exactly final_threshold of S
    else:
        assert 0.2 * total < nz <= 0.25 * total
    if final_mask == "fixed":
        # from the fixing step (t = 9) on, the non-zero pattern of S never changes and equals the fixed mask
        for snap in seen[8:]:
            assert all(torch.equal(snap[n], method.fixed[n]) for n in snap)
        assert [e["step"] for e in method.events] == [4, 6, 8, 9] and method.events[-1]["fixed"]
    else:
        assert [e["step"] for e in method.events] == [4, 6, 8, 9, 10, 12]
        assert [e["fixed"] for e in method.events] == [False, False, False, True, True, True]
        assert all(e["keep_target"] == 0.25 for e in method.events[3:])
        if structured is None:
            assert all(e["kept"] == pytest.approx(0.25, abs=1e-4) for e in method.events[3:])
        assert all(torch.equal(seen[10][n], seen[9][n]) for n in seen[9])  # t = 11: no fold, the t = 10 mask
        assert all(torch.equal(seen[11][n], method.fixed[n]) for n in seen[11])  # the last one, exported
    assert not losparse_layers(plain) and all(isinstance(m, nn.Linear) for m in
                                              [plain.get_submodule(n) for n in method.layers])

    ref = _logits(plain, tok)
    fac_dir = tmp_path / "run" / "factorized"
    re_fac = load_model(str(fac_dir)).model  # the documented loader: the recorded task head comes back
    assert torch.allclose(_logits(re_fac, tok), ref, atol=1e-5)
    assert parameter_counts(re_fac)["linear_kept"] == method.counts["linear_kept"]
    assert parameter_counts(re_fac)["sparse_kept"] == nz
    # what the export stores (a CSR part of S is no Parameter) = what the trained model keeps
    assert parameter_counts(re_fac)["model_params"] == method.counts["model_params"]
    from prunetune.models.factorized import FactorizedLinear

    for n, lay in re_fac.named_modules():
        if isinstance(lay, FactorizedLinear):  # the stored S has exactly the fixed mask's support
            s_part = lay.dense_weight() - lay.U @ lay.V
            assert not bool(((s_part.abs() > 1e-6) & ~method.fixed[n]).any())
    from prunetune.models.export import save_hf_dir

    save_hf_dir(plain, tok, tmp_path / "plain")
    from transformers import AutoModelForSequenceClassification

    re_plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain")
    assert torch.allclose(_logits(re_plain, tok), ref, atol=1e-5)
    assert _logits(re_fac, tok).argmax(-1).tolist() == ref.argmax(-1).tolist()


def test_revival_possible_before_final_warmup():
    """While the schedule runs, the mask follows the scores: an entry pruned at one event may be kept at a
    later one (not so after the mask is fixed)."""
    torch.manual_seed(0)
    lay = LowRankSparseLinear.from_linear(nn.Linear(8, 8), 2)
    method = Losparse(LosparseSpec(keep=0.5, initial_warmup_steps=0, final_warmup_steps=1, deltaT=1,
                                   structured_method=None))
    method.layers = {"l": lay}
    method.schedule = method.spec.schedule(6)
    ctx = MethodContext(max_steps=6)
    masks = []
    for t in range(5):
        g = torch.zeros(8, 8)
        g[:, :4] = 1.0 if t == 0 else 0.0  # first only the left half matters, then only the right half
        g[:, 4:] = 0.0 if t == 0 else 100.0
        lay.weight.grad = g
        with torch.no_grad():
            lay.weight.add_(0.01)  # pruned entries move off zero between events (Adam would do it)
        method.after_step(None, ctx)
        masks.append(lay.weight != 0)
    revived = [bool((later & ~early).any()) for i, early in enumerate(masks) for later in masks[i + 1 :]]
    assert any(revived), "no entry pruned at an event was ever kept again"


# ------------------------------------------------------------------------------------------------ distillation
def test_distillation_losses_from_a_dense_teacher(tmp_path):
    model, tok = _tiny_cls()
    teacher, _ = _tiny_cls()
    with torch.no_grad():
        teacher.classifier.weight.add_(0.5)
    spec = LosparseSpec(keep=0.5, initial_warmup_steps=1, final_warmup_steps=1, kd_weight=1.0, layer_weight=1.0,
                        teacher="given")
    method = Losparse(spec, teacher_model=teacher)
    ctx = MethodContext(max_steps=4)
    model = method.prepare(model, ctx)
    model.train()
    batch = _batches(tok, 1)[0]
    out = model(**batch)
    loss, logs = method.extra_loss(model, batch, out, ctx)
    assert logs["kd_kl"] > 0 and logs["layer_mse"] >= 0 and loss.requires_grad
    # by hand: the KL term on the logits, the MSE of each block's output
    from prunetune.tuning.distill import kl_soft

    with torch.no_grad():
        t_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert logs["kd_kl"] == pytest.approx(float(kl_soft(out.logits, t_logits, 2.0)), rel=1e-5)
    assert float(loss) == pytest.approx(4.0 * logs["kd_kl"] + logs["layer_mse"], rel=1e-5)


def test_teacher_directory_gets_the_students_labels(tmp_path):
    """A dense fine-tuned teacher saved as a directory loads with the student's head (the finetune driver
    passes no label names in the context): distillation runs and the teacher's logits are its saved ones."""
    teacher, tok = _tiny_cls()
    with torch.no_grad():
        teacher.classifier.weight.add_(0.5)
    teacher.config.id2label = {i: f"c{i}" for i in range(4)}
    teacher.config.label2id = {f"c{i}": i for i in range(4)}
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    student = load_model("tiny-bert", "seq-cls", label_names=[f"c{i}" for i in range(4)]).model
    spec = LosparseSpec(keep=0.5, initial_warmup_steps=1, final_warmup_steps=1, kd_weight=1.0,
                        teacher=str(tmp_path / "teacher"))
    method = Losparse(spec)
    student = method.prepare(student, MethodContext(task="seq-cls", max_steps=4))
    assert method.teacher.config.num_labels == 4
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(method.teacher(**enc).logits, teacher.eval()(**enc).logits, atol=1e-5)
    student.train()
    batch = _batches(tok, 1)[0]
    loss, logs = method.extra_loss(student, batch, student(**batch), MethodContext(task="seq-cls"))
    assert logs["kd_kl"] > 0 and loss.requires_grad


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kw,msg", [
    (dict(rank_ratio=1.0), "rank_ratio"), (dict(rank_ratio=0.0), "rank_ratio"), (dict(keep=1.5), "keep"),
    (dict(keep=0.0), "keep"), (dict(structured_direction="diag"), "structured_direction"),
    (dict(kd_weight=1.0), "teacher"),
])
def test_bad_options_are_refused_by_the_one_schema(kw, msg):
    """`LosparseSpec` is the recipe's pydantic section: a library caller's bad option fails at construction,
    naming the option (the CLI turns the same error into one line: tests/test_losparse_cli.py)."""
    with pytest.raises(ValidationError) as e:
        LosparseSpec(**kw)
    assert msg in str(e.value)


def test_rank_and_warmup_errors():
    with pytest.raises(PrunetuneError, match="rank 65 is impossible"):
        LowRankSparseLinear.from_linear(nn.Linear(64, 32), 65)
    with pytest.raises(PrunetuneError, match="rank 33 is impossible"):
        LowRankSparseLinear.from_linear(nn.Linear(64, 32), 33)
    with pytest.raises(PrunetuneError, match="warm-ups") as e:
        LosparseSpec(warmup_steps=10, initial_warmup=1, final_warmup=5).schedule(50)
    assert "\n" not in str(e.value)
    model, tok = _tiny_cls()
    with pytest.raises(PrunetuneError, match="warm-ups"):
        Losparse(LosparseSpec(initial_warmup_steps=3, final_warmup_steps=3)).prepare(model, MethodContext(max_steps=6))
    assert LosparseSchedule(7, 3, 3, 0.1).fix_step == 5
