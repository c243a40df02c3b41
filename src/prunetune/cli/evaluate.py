"""`prunetune eval`: perplexity, task accuracy/macro-F1, pseudo-perplexity, speed, lm-eval; each with its protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from prunetune.cli.app import app, quiet_libraries
from prunetune.cli.common import console, table, write_json
from prunetune.data.sources import load_labelled, load_text
from prunetune.data.tasks import split_labelled, subsample
from prunetune.errors import PrunetuneError
from prunetune.manifest import build_manifest


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="alias, HF dir, .gguf or hub id")],
    ppl: Annotated[Optional[str], typer.Option(
        "--ppl", help="causal perplexity on wikitext2 | bbc-news | FILE (.txt/.csv/.jsonl)")] = None,
    task: Annotated[Optional[str], typer.Option(
        "--task", help="classification on the fixed test split of bbc-news | FILE.csv | FILE.jsonl")] = None,
    pppl: Annotated[Optional[str], typer.Option(
        "--pppl", help="MLM pseudo-perplexity on a text source (masked-LM models)")] = None,
    speed: Annotated[bool, typer.Option(
        "--speed", help="size, parameters, non-zeros, latency, generate tokens/s")] = False,
    split: Annotated[str, typer.Option("--split", help="split of the --ppl/--pppl text")] = "test",
    seqlen: Annotated[int, typer.Option("--seqlen", min=2, help="perplexity window length in tokens")] = 512,
    max_windows: Annotated[Optional[int], typer.Option(
        "--max-windows", min=1, help="score only the first N windows")] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, help="windows / examples per forward (--pppl: masked copies per forward, at least 16)")] = 4,
    max_length: Annotated[int, typer.Option(
        "--max-length", min=2, help="--task: truncate examples to this many tokens")] = 128,
    max_examples: Annotated[Optional[int], typer.Option(
        "--max-examples", min=1, help="--task: stratified subset of the test split")] = None,
    seed: Annotated[int, typer.Option(
        "--split-seed", "--seed", help="--task: seed of the 80/10/10 split (as finetune/payt --split-seed)")] = 0,
    text_column: Annotated[str, typer.Option("--text-column", help="text column of .csv/.jsonl data")] = "text",
    label_column: Annotated[str, typer.Option(
        "--label-column", help="label column of .csv/.jsonl task data")] = "label",
    max_sentences: Annotated[int, typer.Option(
        "--max-sentences", min=1, help="--pppl: first N non-empty lines")] = 64,
    speed_seqlen: Annotated[int, typer.Option("--speed-seqlen", min=1, help="--speed: tokens per sequence")] = 128,
    speed_batch: Annotated[int, typer.Option(
        "--speed-batch", min=1, help="--speed: the batch N besides batch 1")] = 8,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="--speed: timed repeats (median)")] = 5,
    data_dir: Annotated[Optional[Path], typer.Option(
        "--data-dir", help="local WikiText-2 dir (else PRUNETUNE_DATA_DIR or hub)")] = None,
    harness: Annotated[Optional[str], typer.Option(
        "--harness", help="lm-eval tasks, comma-separated (offline: bbc_news_topic)")] = None,
    harness_limit: Annotated[Optional[int], typer.Option(
        "--harness-limit", min=1, help="--harness: first N documents per task")] = None,
    json_out: Annotated[Optional[Path], typer.Option(
        "--json", help="write all results (a manifest) as JSON here")] = None,
) -> None:
    """Evaluate a model: perplexity, task accuracy/macro-F1, pseudo-perplexity, speed; each with its protocol."""
    quiet_libraries()
    import gc
    import time

    # at run time, and each evaluation's module only when asked for: they load torch, which --help must not
    from prunetune.models.loading import load_model, natural_task, weights_path

    if not (ppl or task or pppl or speed or harness):
        raise PrunetuneError("nothing to evaluate: pass --ppl, --task, --pppl, --speed and/or --harness")
    t_start = time.perf_counter()
    dd = str(data_dir) if data_dir else None
    # read every dataset before loading any model: a wrong path fails in a second, not after a minute
    ppl_src = load_text(ppl, split, data_dir=dd, text_column=text_column) if ppl else None
    pppl_src = load_text(pppl, split, data_dir=dd, text_column=text_column) if pppl else None
    task_data = test = None
    if task:
        task_data = load_labelled(task, text_column=text_column, label_column=label_column)
        test = split_labelled(task_data, seed=seed)["test"]
        if not test:
            raise PrunetuneError(f"task data '{task_data.name}' has {len(task_data.examples)} examples: "
                                 "too few for a test split (10% per class)")
        test = subsample(test, max_examples, seed)

    results: dict = {}
    rows: list[tuple[str, str]] = []
    loaded = None
    if ppl_src is not None:
        from prunetune.evaluation.perplexity import perplexity

        loaded = load_model(model, task="causal-lm")
        r = perplexity(loaded.model, loaded.tokenizer, ppl_src, seqlen=seqlen, max_windows=max_windows,
                       batch_size=batch_size)
        results["perplexity"] = r
        p = r["protocol"]
        rows += [(f"perplexity {p['dataset']} ({p['windows']} x {p['seqlen']} tok)", f"{r['value']:.4f}"),
                 ("  seconds", f"{r['seconds']:.1f}")]
    if speed:
        from prunetune.evaluation.speed import speed_report

        if loaded is None:
            nat_task, kw = natural_task(model)
            loaded = load_model(model, task=nat_task, **kw)
        r = speed_report(loaded.model, loaded.tokenizer, weights_path(model), seqlen=speed_seqlen,
                         batch_size=speed_batch, repeats=repeats)
        results["speed"] = r
        rows.append(("parameters / non-zero", f"{r['parameters']:,} / {r['nonzero_parameters']:,}"))
        if r["size_on_disk"]:
            rows.append((f"size on disk ({r['size_on_disk']['format']})", f"{r['size_on_disk']['bytes'] / 2**20:,.1f} MiB"))
        for lat in r["latency"]:
            rows.append((f"latency batch {lat['batch']} x {lat['seqlen']} tok", f"{lat['ms_median']:.1f} ms"))
        if r["generate"]:
            rows.append((f"generate ({r['generate']['new_tokens']} new tokens)", f"{r['generate']['tokens_per_s']:.1f} tok/s"))
        rows.append(("  threads / dtype", f"{r['protocol']['threads']} / {r['protocol']['dtype']}"))
    loaded = None
    gc.collect()
    if task_data is not None:
        from prunetune.evaluation.task import evaluate_classification

        trained_head = _check_classifier(model, task_data.label_names)
        cls = load_model(model, task="seq-cls", label_names=task_data.label_names)
        r = evaluate_classification(cls.model, cls.tokenizer, test, max_length=max_length, batch_size=batch_size,
                                    split="test", dataset=task_data.name)
        r["protocol"].update({"split_seed": seed, "split_fractions": [0.8, 0.1, 0.1], "labels": task_data.label_names,
                              "head": "trained (from checkpoint)" if trained_head else "new, untrained: chance level"})
        results["classification"] = r
        where = f"{task_data.name}/test, n={r['n']}"
        rows += [(f"accuracy ({where})", f"{r['accuracy']:.4f}"), ("macro-F1", f"{r['macro_f1']:.4f}")]
        if not trained_head:
            rows.append(("  head", "new and untrained: expect chance level"))
        cls = None
        gc.collect()
    if pppl_src is not None:
        from prunetune.evaluation.perplexity import pseudo_perplexity

        mlm = load_model(model, task="masked-lm")
        r = pseudo_perplexity(mlm.model, mlm.tokenizer, pppl_src, max_sentences=max_sentences,
                              batch_size=max(batch_size, 16))
        results["pseudo_perplexity"] = r
        rows += [(f"pseudo-perplexity {r['protocol']['dataset']} ({r['protocol']['sentences']} lines)",
                  f"{r['value']:.4f}"), ("  seconds", f"{r['seconds']:.1f}")]
    if harness:
        from prunetune.evaluation.harness import harness_evaluate

        lm = load_model(model, task="causal-lm")
        r = harness_evaluate(lm.model, lm.tokenizer, harness, limit=harness_limit, seed=seed)
        results["harness"] = r
        for name, m in r.items():
            if isinstance(m, dict):
                rows += [(f"lm-eval {name} {k} (n={m['protocol']['documents']})", f"{v:.4f}")
                         for k, v in m.items() if k != "protocol"]
        lm = None
    total = time.perf_counter() - t_start
    rows.append(("total seconds", f"{total:.1f}"))
    console().print(table(f"eval {model}", rows))
    config = {"model": model, "ppl": ppl, "task": task, "pppl": pppl, "speed": speed, "split": split, "seqlen": seqlen,
              "max_windows": max_windows, "batch_size": batch_size, "max_length": max_length,
              "max_examples": max_examples, "max_sentences": max_sentences, "data_dir": dd,
              "harness": harness, "harness_limit": harness_limit}
    write_json(json_out, build_manifest("eval", config, seed=seed, metrics=results, timings={"total_s": total},
                                         extra={"model": model}))


def _check_classifier(spec: str, label_names: list[str]) -> bool:
    """True when `spec` is a trained classifier for these labels; a mismatch is an error, not a silent new head."""
    # at run time: models.loading imports torch, which --help must not load
    from prunetune.models.loading import natural_task

    task, kw = natural_task(spec)
    if task != "seq-cls":
        return False
    names = kw.get("label_names")
    n = len(names) if names else kw.get("num_labels")
    if n != len(label_names):
        raise PrunetuneError(f"{spec} is a classifier with {n} labels but the task data has {len(label_names)}")
    generic = names is None or all(str(x).startswith("LABEL_") for x in names)
    if not generic and list(names) != list(label_names):
        raise PrunetuneError(f"{spec} was trained for labels {names}, the task data has {label_names}")
    return True
