"""The whole method: plan, train the units, compose every configuration and fine-tune it (with and without module-
level FT), for classification and seq2seq.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from transformers import TrainerCallback

from prunetune.data.spec import DataSpec
from prunetune.evaluation.task import predict_classes
from prunetune.methods.composable.cache import ModuleCache, module_ft_settings
from prunetune.methods.composable.compose import (
    compose,
    geometric_checks,
    save_composed,
    text_batches,
)
from prunetune.methods.composable.plan import Configuration, Plan, plan
from prunetune.methods.composable.spec import ComposeSpec
from prunetune.methods.composable.units import train_units
from prunetune.models.arch import get_adapter
from prunetune.models.loading import load_model
from prunetune.tuning.data import load_task_data
from prunetune.tuning.finetune import finetune
from prunetune.tuning.seq2seq import finetune_seq2seq, load_pairs, record, split_pairs
from prunetune.tuning.spec import TuneSpec



class ValidationClock(TrainerCallback):
    """Times optimizer steps and checks validation accuracy at given steps; stops once it reaches `target`.

    The clock counts what a run needs: its steps and, when it stops on a target, the checks that decided it.
    Checks taken only to draw a curve (no target) are timed apart (`curve_eval_s`).
    """

    def __init__(self, tokenizer, examples: Sequence[dict], max_length: int, check_steps: Iterable[int],
                 target: float | None = None) -> None:
        self.tok, self.examples, self.max_length = tokenizer, list(examples), max_length
        self.check_steps = set(check_steps)
        self.target = target
        self.step_s = 0.0
        self.eval_s = 0.0
        self.points: list[dict] = []  # step, accuracy, clock
        self.reached_at: int | None = None
        self._t0: float | None = None

    def accuracy(self, model) -> float:
        preds = predict_classes(model, self.tok, [e["text"] for e in self.examples], self.max_length,
                                progress=False)
        return sum(int(p == e["label"]) for p, e in zip(preds, self.examples)) / len(self.examples)

    def clock(self) -> float:
        return self.step_s + (self.eval_s if self.target is not None else 0.0)

    def check(self, model, step: int) -> bool:
        t = time.perf_counter()
        acc = self.accuracy(model)
        self.eval_s += time.perf_counter() - t
        self.points.append({"step": step, "accuracy": acc, "clock_s": self.clock()})
        if self.target is not None and acc >= self.target - 1e-9 and self.reached_at is None:
            self.reached_at = step
            return True
        return False

    def on_step_begin(self, args, state, control, **kw):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kw):
        if self._t0 is not None:
            self.step_s += time.perf_counter() - self._t0
            self._t0 = None
        if state.global_step in self.check_steps or state.global_step == state.max_steps:
            if self.check(model, state.global_step):
                control.should_training_stop = True
        return control

    def summary(self) -> dict:
        return {"step_s": self.step_s, "eval_s": self.eval_s, "clock_s": self.clock(), "target": self.target,
                "reached_at_step": self.reached_at, "points": self.points}


def run_composable(model_spec: str, out: Path | str, configs: Sequence[Configuration], tune: TuneSpec, *,
                   data: DataSpec | None = None, task: str = "seq-cls", seed: int = 0,
                   spec: ComposeSpec = ComposeSpec(), module_seed: int = 0,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Plan, fine-tune the unique modules once (cached), compose every configuration and fine-tune it at
    model level (`tune`: the recipe's `tune` section, on the labelled task `data.train` (`DataSpec`) with head
    `task` at training seed `seed`, as `tuning.finetune.finetune` takes them). `spec` (the recipe's `compose`
    section) gives the units, criteria, module-level steps, texts and batches, the cache directory and whether
    to run the baseline; `module_seed` seeds module-level FT. With `spec.baseline`, the same
    model-level fine-tuning from the pruned modules without module-level fine-tuning. Writes `out/<config>/{composed,baseline}/` and returns
    per-configuration metrics, validation curves and the compute time of both routes. Each configuration's
    fine-tuned model (composed arm) is exported to `out/<config>/composed/tuned/model/` (its row's `model`,
    relative to `out`): a plain HF directory with the pruned weights at zero and `masks.safetensors` beside."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda msg: None)
    t_all = time.perf_counter()
    source = data if data is not None else DataSpec()
    run = {"data": source, "task": task, "seed": seed}
    data = load_task_data(tune, source, task=task, seed=seed)
    loaded = load_model(model_spec, task, label_names=data["label_names"])
    original, tok = loaded.model, loaded.tokenizer
    adapter = get_adapter(original)
    pl = plan(configs, adapter, attention_units=spec.attention_units, linear_units=spec.linear_units,
              attention_criterion=spec.attention_criterion, linear_criterion=spec.linear_criterion)
    say(f"{len(pl.configs)} configurations -> {len(pl.units)} unique modules "
        f"({pl.unit_count_without_dedup} without deduplication)")
    texts = [e["text"] for e in data["train"]][: spec.module_texts or None]
    batches = text_batches(tok, texts, tune.seqlen, spec.module_batch)
    cache = ModuleCache(spec.cache_dir if spec.cache_dir is not None else out / "module-cache")
    t0 = time.perf_counter()
    results = train_units(original, batches, pl.units, spec, cache, seed=module_seed, progress=say)
    module_s = time.perf_counter() - t0
    steps_per_epoch = max(1, math.ceil(len(data["train"]) / tune.batch_size))
    max_steps = max(1, math.ceil(tune.train_epochs * steps_per_epoch))
    checks = geometric_checks(max_steps)
    rows: list[dict] = []
    arms = [("composed", True)] + ([("baseline", False)] if spec.baseline else [])
    for c in pl.configs:
        row: dict = {"config": c.to_dict()}
        for arm, module_ft in arms:
            t0 = time.perf_counter()
            if module_ft:
                model, masks = compose(original, pl.members[c.name], results)
            else:
                pruned = train_units(original, batches, pl.members[c.name], spec, None, seed=module_seed,
                                     finetune=False)
                model, masks = compose(original, pl.members[c.name], pruned)
            build_s = time.perf_counter() - t0
            d = out / c.name / arm
            save_composed(model, tok, masks, d / "start", {"configuration": c.to_dict(), "module_ft": module_ft})
            clock = ValidationClock(tok, data["validation"], tune.seqlen, checks)
            start_acc = clock.accuracy(model) if task == "seq-cls" else None
            say(f"{c.name} {arm}: model-level fine-tuning ({max_steps} steps)")
            # the configuration's product is the composed arm's fine-tuned model: exported by `finetune` itself
            # as every command's model is (plain HF dir, zeros kept, masks and model card beside, atomic) at
            # tuned/model; the baseline is the control, measured and not kept (one model per configuration)
            r = finetune(str(d / "start"), tune, d / "tuned", **run, export=module_ft, overwrite=True,
                         callbacks=(clock,), kind=f"compose-{arm}")
            import shutil

            shutil.rmtree(d / "tuned" / "checkpoints", ignore_errors=True)
            row[arm] = {"start_val_accuracy": start_acc, "build_s": build_s, "step_s": clock.step_s,
                        "points": [{"step": 0, "accuracy": start_acc}] + clock.points,
                        "accuracy": r.get("accuracy"), "macro_f1": r.get("macro_f1"),
                        "test": r.get("test_after_merge"), "sparsity": r.get("sparsity"),
                        "train_loss": r.get("train_loss"), "log": str(d / "tuned" / "train_log.csv"),
                        "model": (d / "tuned" / "model").relative_to(out).as_posix() if module_ft else None}
        rows.append(row)
    composed_s = module_s + sum(r["composed"]["build_s"] + r["composed"]["step_s"] for r in rows)
    summary = {"plan": pl.to_dict(), "modules": {**results.summary(), "wall_s": module_s,
                                                  "cache": {"hits": cache.hits, "misses": cache.misses,
                                                            "dir": str(cache.root)}},
               "settings": module_ft_settings(spec, module_seed), "rows": rows,
               "compute_s": {"with_composability": composed_s, "module_ft": module_s,
                             "without_composability": (sum(r["baseline"]["build_s"] + r["baseline"]["step_s"]
                                                           for r in rows) if spec.baseline else None)},
               "protocol": {"model_ft_steps": max_steps, "checks": checks, "validation": len(data["validation"]),
                            "test": len(data["test"]), "texts_captured": len(texts)},
               "wall_s": time.perf_counter() - t_all}
    (out / "composable.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def run_composable_seq2seq(model_spec: str, out: Path | str, configs: Sequence[Configuration], tune: TuneSpec, *,
                           data: DataSpec = DataSpec(train="synthetic"), seed: int = 0, prefix: str = "",
                           generation_max_length: int | None = None, spec: ComposeSpec = ComposeSpec(),
                           module_seed: int = 0) -> dict:
    """The same method for an encoder-decoder (T5 translation): module-level FT captures the encoder and the
    decoder on (source, target) pairs, and model-level fine-tuning is `tuning.seq2seq.finetune_seq2seq`
    (`tune`: a full fine-tuning `TuneSpec`, on the pairs `data.train` names, with `seed`, `prefix` and
    `generation_max_length` as there) with BLEU on the test pairs, per configuration, with and without module FT;
    `spec` and `module_seed` as in `run_composable`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(model_spec, "seq2seq")
    original, tok = loaded.model, loaded.tokenizer
    pl = plan(configs, get_adapter(original), attention_units=spec.attention_units, linear_units=spec.linear_units,
              attention_criterion=spec.attention_criterion, linear_criterion=spec.linear_criterion)
    n_samples = tune.train_samples
    pairs = split_pairs(load_pairs(data.train, seed, n=max(50, int((n_samples or 400) / 0.8) + 2)))["train"]
    pairs = pairs[: spec.module_texts or None]
    batches = text_batches(tok, [prefix + p["source"] for p in pairs], tune.seqlen, spec.module_batch,
                           targets=[p["target"] for p in pairs])
    cache = ModuleCache(spec.cache_dir if spec.cache_dir is not None else out / "module-cache")
    t0 = time.perf_counter()
    results = train_units(original, batches, pl.units, spec, cache, seed=module_seed)
    module_s = time.perf_counter() - t0
    rows = []
    for c in pl.configs:
        row: dict = {"config": c.to_dict()}
        for arm, module_ft in [("composed", True)] + ([("baseline", False)] if spec.baseline else []):
            t0 = time.perf_counter()
            res = results if module_ft else train_units(original, batches, pl.members[c.name], spec, None,
                                                        seed=module_seed, finetune=False)
            model, masks = compose(original, pl.members[c.name], res)
            build_s = time.perf_counter() - t0
            r = finetune_seq2seq(model, tok, tune, out / c.name / arm, data=data, seed=seed, prefix=prefix,
                                 generation_max_length=generation_max_length, masks=masks)
            row[arm] = {"build_s": build_s, "train_s": r["timings"]["train_s"], "bleu": r["bleu"],
                        "loss": r["loss"], "start": r["before"], "train_loss": r["train_loss"],
                        "log": str(out / c.name / arm / "train_log.csv")}
            row[arm]["start"] = {k: v for k, v in r["before"].items() if k != "examples"}
        rows.append(row)
    summary = {"plan": pl.to_dict(), "modules": {**results.summary(), "wall_s": module_s}, "rows": rows,
               "settings": module_ft_settings(spec, module_seed),
               "tune": record(tune, data, seed, prefix, generation_max_length)}
    (out / "composable.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
