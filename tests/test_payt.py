"""Prune-As-You-Tune: exact sparsity per layer, masks saved, export keeps predictions and zeros, CLI.

The two-process (DDP) PAYT run is in test_distributed.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import cli_error, cli_ok
from prunetune.data.spec import MixSpec
from prunetune.methods.payt import PaytSpec, compute_masks, run_payt
from prunetune.pruning.masks import MaskSet, sparsity_report
from prunetune.tuning.spec import TuneSpec


def _tune(**kw) -> TuneSpec:
    """LoRA on 16 examples of the default task data (bbc-news), 2 epochs, with KD."""
    base = dict(steps=None, n_samples=16, eval_samples=8, test_samples=40, epochs=2, batch_size=8, seqlen=32,
                retention=False, kd=True)
    base.update(kw)
    return TuneSpec(**base)


def test_compute_masks_is_exact_and_monotone(tiny_llama):
    model = tiny_llama.model
    m1 = compute_masks(model, "l1-global", 0.3)
    total = sum(m.numel() for m in m1.masks.values())
    assert total - sum(int(m.sum()) for m in m1.masks.values()) == int(0.3 * total)
    m1.apply(model)
    m2 = compute_masks(model, "L1Unstructured", 0.6, previous=m1)
    for name in m1.names():
        assert not bool((m2[name] & ~m1[name]).any()), "a weight pruned earlier came back"
    pytest.importorskip("prunetune.pruning.api")  # Wanda comes from the pruning engine
    from prunetune.data.sources import load_text
    from prunetune.tuning.lora import apply_lora

    peft = apply_lora(model, "causal-lm", rank=2, alpha=4)
    text = load_text("wikitext2", "valid").text[:100_000]
    w = compute_masks(peft, "wanda", 0.7, previous=m2, tokenizer=tiny_llama.tokenizer, calib_text=text, nsamples=2,
                      seqlen=64)
    assert set(w.names()) == set(m1.names())  # plain-model names, no peft ".base_layer"
    assert all(not bool((w[n] & ~m2[n]).any()) for n in w.names()) and w.sparsity() >= 0.6
    cols = compute_masks(model, "LnStructured", 0.5)
    for name, m in cols.items():
        dead_cols = (~m.any(dim=0)).sum()
        assert int(dead_cols) == m.shape[1] // 2 and 1 - m.float().mean() == 0.5


@pytest.mark.parametrize("criterion", ["l2-cols", "l1-global"])
def test_payt_reaches_target_in_real_zeros(tmp_path, criterion):
    spec = PaytSpec(sparsity=0.5, schedule="agp", start=0.2, every=1, unit="step", criterion=criterion)
    r = run_payt("tiny-llama", _tune(mix=MixSpec(fraction=0.1)), spec, tmp_path / "payt")
    events = r["pruning_events"]
    # 16 + 2 mixed examples / batch 8 = 3 steps x 2 epochs; start 20% -> step floor(1.2) = 1, then every step
    assert r["global_step"] == 6 and [e["step"] for e in events] == [1, 2, 3, 4, 5]
    assert events[-1]["target"] == 0.5 and events[-1]["real_sparsity"] == pytest.approx(0.5, abs=1e-12)
    assert [e["target"] for e in events] == sorted(e["target"] for e in events)
    rep = sparsity_report(r["_model"])
    if criterion == "l2-cols":  # per-layer exact: every pruned layer has exactly the target in real zeros
        assert all(layer["sparsity"] == 0.5 for layer in rep["layers"].values())
    else:  # global: exactly floor(0.5 * total) zeros over all prunable linears
        assert rep["zeros"] == rep["numel"] // 2
    saved = MaskSet.load(tmp_path / "payt" / "model")
    assert saved.sparsity() == pytest.approx(0.5, abs=1e-12)
    ckpts = sorted((tmp_path / "payt" / "checkpoints").glob("checkpoint-*"))
    assert ckpts and all((c / "masks.safetensors").is_file() for c in ckpts)
    assert r["mixing"]["mixed"] == 2


def test_merged_export_reloads_with_plain_transformers_same_predictions(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prunetune.tuning.lora import mask_lora_updates
    from prunetune.evaluation.task import predict_classes

    spec = PaytSpec(sparsity=0.5, schedule="linear", start=0.0, every=1, unit="epoch")
    r = run_payt("tiny-llama", _tune(), spec, tmp_path / "run")
    assert r["merge_changed_predictions"] == 0
    assert r["test_after_merge"]["accuracy"] == r["test_before_merge"]["accuracy"]
    d = tmp_path / "run" / "model"
    plain = AutoModelForSequenceClassification.from_pretrained(d).eval()
    tok = AutoTokenizer.from_pretrained(d)
    preds = predict_classes(plain, tok, [e["text"] for e in r["_test"]], 32)
    assert preds == r["predictions"]
    assert sparsity_report(plain)["sparsity"] == pytest.approx(0.5, abs=1e-12)
    # adapter export: sparse base + adapter; with the masked update it is the same model again
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "adapter" / "base")
    assert sparsity_report(base)["sparsity"] == pytest.approx(0.5, abs=1e-12)
    peft = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter" / "adapter").eval()
    mask_lora_updates(peft, MaskSet.load(tmp_path / "run" / "adapter" / "base"))
    assert predict_classes(peft, tok, [e["text"] for e in r["_test"]], 32) == preds


def test_payt_epoch_aligned_events_fall_on_epoch_boundaries(tmp_path):
    """`align: epoch` in a real run: 16 examples / batch 4 = 4 steps an epoch, 3 epochs (12 steps); start 0.5 is
    step floor(6) = 6, mid epoch 1, aligned down to that epoch's first step 4, then every epoch (8; 12 is the end)."""
    spec = PaytSpec(sparsity=0.5, schedule="linear", start=0.5, every=1, unit="epoch", align="epoch")
    r = run_payt("tiny-llama", _tune(kd=False, epochs=3, batch_size=4), spec, tmp_path / "payt")
    assert r["global_step"] == 12
    assert [e["step"] for e in r["pruning_events"]] == [4, 8]
    assert [e["target"] for e in r["pruning_events"]] == pytest.approx([0.25, 0.5])
    assert r["pruning_events"][-1]["real_sparsity"] == pytest.approx(0.5, abs=1e-12)
    unaligned = PaytSpec(sparsity=0.5, schedule="linear", start=0.5, every=1, unit="epoch")
    assert [e.step for e in unaligned.plan(12, 4)] == [6, 10]


def test_payt_paper_preset_aligns_to_epochs_and_cpu_preset_does_not():
    from prunetune.config import load_recipe

    paper, cpu = load_recipe("payt-paper").payt, load_recipe("payt").payt
    assert (paper.unit, paper.align) == ("epoch", "epoch")
    assert (cpu.unit, cpu.align) == ("epoch", "step")


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_accepts_original_payt_option_names(tmp_path, capsys):
    out = tmp_path / "cli"
    cli_ok(["payt", "tiny-llama", "--n-samples", "8", "--num-epochs", "1", "--max-length", "32",
            "--sparsity-target", "0.4", "--pruning-schedule", "linear", "--start-pruning-epoch-ptg", "0.0",
            "--prune-every-epoch", "1", "--pruning-method", "L1Unstructured", "--use-kd", "--kd-alpha", "0.5",
            "--kd-temp", "4", "--use-lora", "--use-rs-lora", "--lora-rank", "4", "--lora-alpha", "8",
            "--lora-dropout", "0.0", "--dataset-mix-ptg", "0.1", "--dataset-mix-strategy", "old_first",
            "--dataset-sampling-strategy", "random", "--eval-samples", "4", "--test-samples", "20",
            "--no-retention", "--out", str(out)], capsys)
    m = json.loads((out / "metrics.json").read_text())
    assert abs(m["sparsity"] - 0.4) < 1e-5  # floor(0.4 * numel) zeros
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["tune"]["rslora"] is True and man["config"]["payt"]["criterion"] == "l1-global"
    assert man["config"]["tune"]["mix"]["strategy"] == "old_first" and m["mixing"]["mixed"] == 1


@pytest.mark.parametrize("args,msg", [
    (["--sparsity", "1.0"], "--sparsity (payt.sparsity): Input should be less than 1"),
    (["--start", "1"], "--start (payt.start)"),
    (["--schedule", "cosine"], "--schedule (payt.schedule): 'cosine' is not allowed; choose one of"),
    (["--criterion", "random"], "--criterion (payt.criterion): 'random' is not allowed; choose one of"),
    (["--kd-alpha", "2"], "--kd-alpha"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, args, msg):
    cli_error(["payt", "tiny-llama", *args, "--out", str(tmp_path / "x")], capsys, needle=msg)


def test_cli_bad_task_data_is_one_line_exit_2(tmp_path, capsys):
    one = tmp_path / "one.csv"
    one.write_text("text,label\nhello world,a\nanother text,a\n")
    cli_error(["finetune", "tiny-llama", "--task", str(one), "--out", str(tmp_path / "o")], capsys,
              needle="only one class")
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n ,a\n,b\n")
    cli_error(["finetune", "tiny-llama", "--task", str(empty), "--out", str(tmp_path / "o2")], capsys,
              needle="no non-empty text")


def test_wanda_events_tokenise_the_training_text_once_and_masks_are_unchanged(tiny_llama, monkeypatch):
    """PAYT's callback cuts the calibration windows at its first event and reuses them: same masks, one tokenising."""
    from prunetune.methods.payt import PaytCallback
    from prunetune.pruning import calibrate  # where calibration_ids finds calibration_samples

    text = " ".join(f"article {i} about markets, football and elections." for i in range(400))
    import copy

    model = copy.deepcopy(tiny_llama.model)  # prune() zeroes what it prunes: each path starts from the same weights
    first = copy.deepcopy(model)
    want = [compute_masks(first, "wanda", s, tokenizer=tiny_llama.tokenizer, calib_text=text, nsamples=4, seqlen=32)
            for s in (0.3, 0.6)]
    calls = []
    real = calibrate.calibration_samples
    monkeypatch.setattr(calibrate, "calibration_samples", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = PaytSpec(sparsity=0.6, criterion="wanda", nsamples=4, seqlen=32)
    cb = PaytCallback(spec, MaskSet(), {"model": model}, tokenizer=tiny_llama.tokenizer, calib_text=text)
    got = []
    for s in (0.3, 0.6):
        got.append(compute_masks(model, "wanda", s, MaskSet(), tiny_llama.tokenizer, cb._calib(), 4, 32))
    assert len(calls) == 1, "the training text was tokenised more than once"
    for w, g in zip(want, got):
        assert set(w.names()) == set(g.names()) and all(torch.equal(w[n], g[n]) for n in w.names())


# ------------------------------------------------------------------------------------------------ --full-evaluate
# tiny-llama on BBC News: 8 training examples, one epoch, 25% general text mixed in, retention on 1 window
FE_ARGS = ["--n-samples", "8", "--epochs", "1", "--eval-samples", "8", "--test-samples", "40", "--batch-size", "8",
           "--max-length", "32", "--kd", "--sparsity", "0.5", "--start", "0"]
FE_LABELS = ["dense full FT", "dense LoRA FT", "prune (no FT)", "prune -> full FT", "prune -> LoRA FT", "PAYT",
             "PAYT without KD", "PAYT rsLoRA"]


def _old_driver(recipe, out) -> dict:
    """The eight configurations exactly as `prunetune payt --full-evaluate` ran them before it became a recipe
    (the method's own driver, kept here as the reference): one process, one run after the other, each from
    the original model with the command's settings at the recipe's seed."""
    from prunetune.methods.payt import PaytMethod, prune_only
    from prunetune.pipelines.stages import tune_run
    from prunetune.tuning.finetune import finetune

    run, tune = tune_run(recipe, recipe.seed, export=True), recipe.tune
    spec = recipe.payt
    model = recipe.model.name
    # the baselines: no KD, no mixing (`baselines: plain`, the default)
    plain = tune.model_copy(update={"kd": False, "mix": tune.mix.model_copy(update={"fraction": 0.0})})
    full_cfg = plain.model_copy(update={"mode": "full", "lr": None})
    lora_cfg = plain.model_copy(update={"mode": "lora"})
    nokd_cfg = tune.model_copy(update={"kd": False})
    other_cfg = tune.model_copy(update={"rslora": not tune.rslora})
    oneshot = PaytSpec(sparsity=spec.sparsity, schedule="oneshot", start=0.0, every=1, unit="step",
                       criterion=spec.criterion, nsamples=spec.nsamples, seqlen=spec.seqlen)
    plan = [
        ("dense full FT", lambda d: finetune(model, full_cfg, d, **run, kind="dense-full")),
        ("dense LoRA FT", lambda d: finetune(model, lora_cfg, d, **run, kind="dense-lora")),
        ("prune (no FT)", lambda d: prune_only(model, tune, spec, data=run["data"], task=run["task"],
                                               seed=run["seed"])),
        ("prune -> full FT", lambda d: finetune(model, full_cfg, d, **run, method=PaytMethod(oneshot),
                                                kind="prune-full")),
        ("prune -> LoRA FT", lambda d: finetune(model, lora_cfg, d, **run, method=PaytMethod(oneshot),
                                                kind="prune-lora")),
        ("PAYT", lambda d: finetune(model, tune, d, **run, method=PaytMethod(spec), kind="payt")),
        ("PAYT without KD", lambda d: finetune(model, nokd_cfg, d, **run, method=PaytMethod(spec), kind="payt-nokd")),
        ("PAYT rsLoRA", lambda d: finetune(model, other_cfg, d, **run, method=PaytMethod(spec),
                                           kind="payt-other-scaling")),
    ]
    return {label: fn(out / str(i)) for i, (label, fn) in enumerate(plan)}


def _untimed(v):
    """`v` without its wall-clock entries (`seconds`), at any depth."""
    if isinstance(v, dict):
        return {k: _untimed(x) for k, x in v.items() if k != "seconds"}
    if isinstance(v, list):
        return [_untimed(x) for x in v]
    return v


def _comparable(r: dict) -> dict:
    """A run's numbers (not its timings, paths or provenance)."""
    keys = ("accuracy", "macro_f1", "sparsity", "train_loss", "global_step", "train_examples", "teacher", "mixing",
            "masks_digest", "test_after_merge", "test_before_merge", "retention", "pruning_events")
    return _untimed({k: r.get(k) for k in keys})


def _capture_configurations(monkeypatch, baselines: str | None) -> dict:
    """Each trained configuration's tuning settings as `run_configuration` hands them to `finetune` (not run)."""
    from prunetune.config import load_recipe
    from prunetune.methods.payt import comparison
    from prunetune.pipelines.stages import tune_run

    seen: dict = {}

    def fake(model, tune, out, method=None, kind=None, **kw):
        seen[kind] = (tune, method)
        return {"kind": kind}

    monkeypatch.setattr(comparison, "finetune", fake)
    recipe = load_recipe("payt")  # KD (alpha 0.3) and 5% mixing: what the PAYT rows train with
    tune, run_kw = recipe.tune, tune_run(recipe, recipe.seed, export=True)
    assert tune.kd and tune.mix.fraction == 0.05
    for run in ("dense-full", "dense-lora", "prune-full", "prune-lora", "payt", "payt-nokd", "payt-other-scaling"):
        kw = {} if baselines is None else {"baselines": baselines}
        comparison.run_configuration(run, "tiny-llama", tune, recipe.payt, "unused", **run_kw, **kw)
    assert tune.kd and tune.mix.fraction == 0.05  # the caller's settings are not changed
    return seen


def test_full_evaluate_baselines_are_plain_by_default_and_distilled_on_request(monkeypatch):
    seen = _capture_configurations(monkeypatch, None)
    for run in ("dense-full", "dense-lora", "prune-full", "prune-lora"):
        cfg, _ = seen[run]
        assert cfg.kd is False and cfg.mix.fraction == 0.0, run
    assert seen["dense-full"][0].lora is False and seen["prune-full"][0].lora is False
    assert seen["prune-lora"][1].spec.schedule == "oneshot" and seen["prune-lora"][1].spec.start == 0.0
    for run in ("payt", "payt-other-scaling"):  # the PAYT rows keep the run's KD and mixing
        assert seen[run][0].kd is True and seen[run][0].mix.fraction == 0.05, run
    assert seen["payt-nokd"][0].kd is False and seen["payt-nokd"][0].mix.fraction == 0.05
    distilled = _capture_configurations(monkeypatch, "distilled")
    for run in ("dense-full", "dense-lora", "prune-full", "prune-lora"):
        assert distilled[run][0].kd is True and distilled[run][0].mix.fraction == 0.05, run


def test_full_evaluate_plain_baseline_trains_without_teacher_or_mixing(tmp_path):
    """A real baseline run: teacher none and 0 mixed examples (the table's KD "no" and mixing "no" cells)."""
    from prunetune.methods.payt import comparison

    cfg = _tune(kd=True, epochs=1, mix=MixSpec(fraction=0.25))
    spec = PaytSpec(sparsity=0.5, schedule="linear", start=0.0, unit="step")
    r = comparison.run_configuration("prune-lora", "tiny-llama", cfg, spec, tmp_path / "pl")
    assert r["teacher"] == "none" and r["mixing"]["mixed"] == 0 and r["train_examples"] == 16
    assert r["sparsity"] == pytest.approx(0.5, abs=1e-12)
    row = comparison.comparison_table({"prune -> LoRA FT": comparison.table_row(r)})["rows"][0]
    assert row[6:] == ["no", "no"]
    d = comparison.run_configuration("prune-lora", "tiny-llama", cfg, spec, tmp_path / "pd", baselines="distilled")
    assert d["teacher"] != "none" and d["mixing"]["mixed"] == 4 and d["train_examples"] == 20
    assert comparison.comparison_table({"x": comparison.table_row(d)})["rows"][0][6:] == ["yes", "4 (25%)"]


def test_cli_baselines_flag_reaches_the_recipe(capsys):
    import yaml

    printed = yaml.safe_load(cli_ok(["payt", "tiny-bert", "--full-evaluate", "--print-recipe"], capsys))
    assert printed["full_evaluate"]["baselines"] == "plain"
    printed = yaml.safe_load(cli_ok(["payt", "tiny-bert", "--full-evaluate", "--baselines", "distilled",
                                     "--print-recipe"], capsys))
    assert printed["full_evaluate"]["baselines"] == "distilled"
    cli_error(["payt", "tiny-bert", "--baselines", "distilled", "--print-recipe"], capsys,
              "--baselines applies to --full-evaluate only")
    cli_error(["payt", "tiny-bert", "--full-evaluate", "--baselines", "kd", "--print-recipe"], capsys, "baselines")


@pytest.mark.slow  # the eight configurations twice: through the recipe, then directly
def test_full_evaluate_is_a_recipe_with_the_old_drivers_numbers(tmp_path, capsys):
    """`payt --full-evaluate` runs one stage per configuration through the runner; every row's numbers equal the
    same configuration run directly (the former driver), and the table has the seed's rows and columns."""
    import yaml

    from prunetune.config import validate_recipe

    args = ["payt", "tiny-llama", "--full-evaluate", *FE_ARGS, "--retention", "--retention-windows", "1",
            "--mix", "0.25"]
    printed = yaml.safe_load(cli_ok([*args, "--print-recipe"], capsys))
    recipe = validate_recipe(printed, "printed")
    names = ["original", "dense-full", "dense-lora", "prune-only", "prune-full", "prune-lora", "payt", "payt-nokd",
             "payt-other-scaling", "table"]
    assert [s["name"] for s in printed["stages"]] == names and {s["type"] for s in printed["stages"]} == {"full_evaluate"}
    out = tmp_path / "fe"
    text = cli_ok([*args, "--out", str(out)], capsys)
    assert "| PAYT |" in text
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "complete" and man["stages"] == [f"{i + 1:02d}-{n}" for i, n in enumerate(names)]
    res = json.loads((out / "full_evaluate.json").read_text())
    labels = [row[0] for row in res["table"]["rows"]]
    assert labels == ["original (no tuning)", *FE_LABELS]
    for stage in man["stages"][1:-1]:  # every configuration from the recipe's model, at the recipe's seed
        sm = json.loads((out / "stages" / stage / "manifest.json").read_text())
        assert sm["model_in"] == "tiny-llama" and not sm["produces_model"]
        assert (out / "stages" / stage / "result.json").is_file()

    ref = _old_driver(recipe, tmp_path / "old")
    for label in FE_LABELS:
        assert _comparable(res["runs"][label]) == _comparable(json.loads(json.dumps(ref[label], default=str))), label
    assert res["runs"]["PAYT"]["accuracy"] == man["metrics"]["07-payt"]["task/accuracy"]["value"]

    rows = res["table"]["rows"]
    assert all(row[4] is not None and row[4] > 1 for row in rows)  # perplexities, all measured
    sp = {row[0]: row[3] for row in rows}
    assert sp["dense full FT"] == 0.0 and sp["dense LoRA FT"] == 0.0
    assert all(sp[k] == pytest.approx(0.5) for k in labels if k.startswith(("prune", "PAYT")))
    kd = {row[0]: row[6] for row in rows}
    mixing = {row[0]: row[7] for row in rows}
    assert kd["PAYT"] == "yes" and kd["PAYT without KD"] == "no" and kd["prune (no FT)"] == "no"
    assert mixing["PAYT"] == "2 (25%)" and mixing["prune (no FT)"] == "no"
    for base in ("dense full FT", "dense LoRA FT", "prune -> full FT", "prune -> LoRA FT"):  # plain baselines
        assert kd[base] == "no" and mixing[base] == "no", base
    assert res["runs"]["PAYT rsLoRA"]["train_loss"] != res["runs"]["PAYT"]["train_loss"]
    assert res["runs"]["prune (no FT)"]["timings"]["train_s"] == 0.0
    assert res["tune"]["seed"] == 0 and res["full_ft_learning_rate"] == 1e-4
    md = (out / "full_evaluate.md").read_text()
    assert md.count("\n") == 11 and "macro-F1" in md and "| KD | mixing |" in md


def test_full_evaluate_interrupted_resumes_and_skips_completed_configurations(tmp_path, capsys, monkeypatch):
    from cli_helpers import run_cli
    from prunetune.pipelines import stages

    real = stages.run_full_evaluate

    def interrupted(state, out_dir):
        if state.spec.run == "prune-only":
            raise KeyboardInterrupt  # Ctrl-C during the third configuration
        return real(state, out_dir)

    out = tmp_path / "fe"
    args = ["payt", "tiny-llama", "--full-evaluate", *FE_ARGS, "--no-retention", "--out", str(out)]
    monkeypatch.setattr(stages, "run_full_evaluate", interrupted)
    code, _, err = run_cli(args, capsys)
    assert code == 130 and "interrupted" in err
    assert sorted(d.name for d in (out / "stages").iterdir()) == ["01-dense-full", "02-dense-lora", "03-prune-only.partial"]
    done = {d: (out / "stages" / d / "manifest.json").read_text() for d in ("01-dense-full", "02-dense-lora")}
    assert not (out / "full_evaluate.json").exists()

    monkeypatch.setattr(stages, "run_full_evaluate", real)
    text = cli_ok([*args, "--resume"], capsys)
    assert text.count("complete, skipped (resume)") == 2
    assert all((out / "stages" / d / "manifest.json").read_text() == m for d, m in done.items())  # not rerun
    res = json.loads((out / "full_evaluate.json").read_text())
    assert [row[0] for row in res["table"]["rows"]] == FE_LABELS
    first = json.loads(done["01-dense-full"])["metrics"]
    assert res["runs"]["dense full FT"]["accuracy"] == first["task/accuracy"]["value"]
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert not list((out / "stages").glob("*.partial"))
