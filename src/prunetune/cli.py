"""Command line: thin wrappers from flags to library calls. No algorithm lives here.

Every user mistake ends as one line on stderr and exit code 2 (`main` below); tracebacks are for bugs.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from prunetune.errors import PrunetuneError

# Before torch loads OpenMP: spinning worker threads make every op wait for a descheduled peer when the CPU
# is shared (measured: a SmolLM2 512-token forward 11-17 s spinning vs 3.3 s passive on a loaded 2-core box).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Compress pre-trained transformers by pruning while fine-tuning, with honest evaluation.",
)


@app.callback()
def _options(
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="also load pickle checkpoints (pytorch_model.bin), "
                                      "which can run code when loaded: only for sources you trust"),
) -> None:
    """Options of every command (also accepted after the command name)."""
    if allow_pickle:
        from prunetune.models.loading import ALLOW_PICKLE_ENV

        os.environ[ALLOW_PICKLE_ENV] = "1"  # read by the loader, inherited by the ranks of a launch


GLOBAL_FLAGS = ("--allow-pickle",)


def _global_flags_first(argv: list[str]) -> list[str]:
    """`prunetune eval DIR --allow-pickle` as `prunetune --allow-pickle eval DIR`: click reads a group's
    options before the command name only, users write them anywhere."""
    flags = [a for a in argv if a in GLOBAL_FLAGS]
    return flags + [a for a in argv if a not in GLOBAL_FLAGS]


QUIET_LOGGERS = ("huggingface_hub", "datasets", "httpx", "httpcore", "urllib3", "filelock", "fsspec")


def _quiet_libraries() -> None:
    """Our progress bars, tables and one-line errors are the output; silence the libraries' own chatter.

    Offline, a hub lookup that is bound to fail (e.g. `--task no-such-task`) would otherwise print its HTTP
    retries and warnings before prunetune's one line says what is wrong.
    """
    import logging

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers missing is reported where it is used
        pass
    for mod in ("huggingface_hub.utils.logging", "datasets.utils.logging"):
        try:  # their own handlers ignore the root's levels; set each library's verbosity too
            lib = __import__(mod, fromlist=["set_verbosity"])
            lib.set_verbosity(logging.CRITICAL)
            getattr(lib, "disable_progress_bar", lambda: None)()
        except Exception:  # pragma: no cover - optional dependency
            pass


# ------------------------------------------------------------------------------------------------ output dirs
_NEW_OUTPUTS: list[tuple[Path, Path]] = []  # (output dir, topmost dir it creates): removed if a failure leaves them empty


def _claim_out(out: Path) -> Path:
    """Check that `out` can be created before any work starts, and remember to remove it if it stays empty.

    Checked on the nearest existing ancestor: it must be a writable directory. The check runs before the
    model loads, so a typo in --out fails in a second, in one line.
    """
    out = Path(out).expanduser()
    if out.exists():
        if not out.is_dir():
            raise PrunetuneError(f"output path {out} exists and is not a directory")
        return out
    top, anc = out, out.parent
    while not anc.exists() and anc != anc.parent:
        top, anc = anc, anc.parent
    if not anc.is_dir():
        raise PrunetuneError(f"cannot create output directory {out}: {anc} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise PrunetuneError(f"cannot create output directory {out}: {anc} is not writable")
    _NEW_OUTPUTS.append((out, top))
    return out


def _remove_empty_outputs() -> None:
    """A failed command leaves no empty output directory behind (nor the empty parents it created)."""
    for out, top in reversed(_NEW_OUTPUTS):
        d = out
        while d.is_dir() and not any(d.iterdir()):
            try:
                d.rmdir()
            except OSError:
                break
            if d == top:
                break
            d = d.parent
    _NEW_OUTPUTS.clear()


def _console():
    from rich.console import Console

    return Console()


def _write_json(path: Optional[Path], payload: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))


def _table(title: str, rows: list[tuple[str, str]]):
    from rich.table import Table

    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in rows:
        t.add_row(k, v)
    return t


# ------------------------------------------------------------------------------------------------ info
@app.command()
def info(
    model: str = typer.Argument(..., help="alias (smollm2-135m, minilm-l6, tiny-llama, ...), HF dir, .gguf or hub id"),
    layers: bool = typer.Option(True, "--layers/--no-layers", help="print per-layer sparsity"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the result as JSON here"),
) -> None:
    """Family, head, parameter count, geometry, size on disk and per-layer sparsity of a model."""
    _quiet_libraries()
    from rich.table import Table

    from prunetune.evaluation.speed import size_on_disk
    from prunetune.models.arch import get_adapter, nonzero_count, parameter_count
    from prunetune.models.loading import load_model, natural_task, weights_path
    from prunetune.pruning.masks import sparsity_report

    task, kw = natural_task(model)
    loaded = load_model(model, task=task, **kw)
    adapter = get_adapter(loaded.model)
    desc = adapter.describe()
    rep = sparsity_report(loaded.model)
    params = parameter_count(loaded.model)
    wpath = weights_path(model)
    disk = size_on_disk(wpath) if wpath is not None else None
    labels = list((loaded.model.config.id2label or {}).values()) if task == "seq-cls" else None
    payload = {"model": model, "source": loaded.source, "task": task, "class": type(loaded.model).__name__,
               **desc, "parameters": params, "nonzero_parameters": nonzero_count(loaded.model),
               "size_on_disk": disk, "labels": labels, "prunable_sparsity": rep["sparsity"], "layers": rep["layers"]}
    rows = [
        ("source", loaded.source), ("family", desc["family"]), ("head", f"{task} ({payload['class']})"),
        ("blocks", str(desc["blocks"])), ("hidden", str(desc["hidden_size"])),
        ("heads / kv heads / head_dim", f"{desc['heads']} / {desc['kv_heads']} / {desc['head_dim']}"),
        ("mlp width", str(desc["mlp_width"])), ("parameters", f"{params:,}"),
        ("non-zero parameters", f"{payload['nonzero_parameters']:,}"),
        ("prunable linears", str(len(rep["layers"]))), ("prunable sparsity", f"{rep['sparsity']:.4%}"),
    ]
    if labels:
        rows.insert(3, ("labels", ", ".join(map(str, labels))))
    if desc.get("shrunk"):  # physically removed structures (structured.shrink): original -> current width
        names = {"heads": "kv heads", "neurons": "mlp width", "hidden": "hidden"}
        rows.append(("shrunk (before -> after)", ", ".join(
            f"{names.get(k, k)} {v['before']} -> {v['after']}" for k, v in desc["shrunk"].items())))
    if disk:
        rows.append((f"size on disk ({disk['format']})", f"{disk['bytes'] / 2**20:,.1f} MiB"))
    con = _console()
    con.print(_table(f"{model}", rows))
    if layers:
        t = Table(title="per-layer sparsity (real zeros)", header_style="bold")
        for c in ("layer", "role", "shape", "sparsity"):
            t.add_column(c, justify="right" if c == "sparsity" else "left")
        for name, r in rep["layers"].items():
            t.add_row(name, r["role"], "x".join(map(str, r["shape"])), f"{r['sparsity']:.2%}")
        con.print(t)
    _write_json(json_out, payload)


# ------------------------------------------------------------------------------------------------ eval
@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="alias, HF dir, .gguf or hub id"),
    ppl: Optional[str] = typer.Option(None, "--ppl", help="causal perplexity on wikitext2 | bbc-news | FILE (.txt/.csv/.jsonl)"),
    task: Optional[str] = typer.Option(None, "--task", help="classification on the fixed test split of bbc-news | FILE.csv | FILE.jsonl"),
    pppl: Optional[str] = typer.Option(None, "--pppl", help="MLM pseudo-perplexity on a text source (masked-LM models)"),
    speed: bool = typer.Option(False, "--speed", help="size, parameters, non-zeros, latency, generate tokens/s"),
    split: str = typer.Option("test", "--split", help="split of the --ppl/--pppl text"),
    seqlen: int = typer.Option(512, "--seqlen", min=2, help="perplexity window length in tokens"),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", min=1, help="score only the first N windows"),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="windows / examples per forward (--pppl: masked copies per forward, at least 16)"),
    max_length: int = typer.Option(128, "--max-length", min=2, help="--task: truncate examples to this many tokens"),
    max_examples: Optional[int] = typer.Option(None, "--max-examples", min=1, help="--task: stratified subset of the test split"),
    seed: int = typer.Option(0, "--split-seed", "--seed", help="--task: seed of the 80/10/10 split (as finetune/payt --split-seed)"),
    text_column: str = typer.Option("text", "--text-column", help="text column of .csv/.jsonl data"),
    label_column: str = typer.Option("label", "--label-column", help="label column of .csv/.jsonl task data"),
    max_sentences: int = typer.Option(64, "--max-sentences", min=1, help="--pppl: first N non-empty lines"),
    speed_seqlen: int = typer.Option(128, "--speed-seqlen", min=1, help="--speed: tokens per sequence"),
    speed_batch: int = typer.Option(8, "--speed-batch", min=1, help="--speed: the batch N besides batch 1"),
    repeats: int = typer.Option(5, "--repeats", min=1, help="--speed: timed repeats (median)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="local WikiText-2 dir (else PRUNETUNE_DATA_DIR or hub)"),
    harness: Optional[str] = typer.Option(None, "--harness", help="lm-eval tasks, comma-separated (offline: bbc_news_topic)"),
    harness_limit: Optional[int] = typer.Option(None, "--harness-limit", min=1, help="--harness: first N documents per task"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write all results (a manifest) as JSON here"),
) -> None:
    """Evaluate a model: perplexity, task accuracy/macro-F1, pseudo-perplexity, speed; each with its protocol."""
    _quiet_libraries()
    import gc
    import time

    from prunetune.data.sources import load_labelled, load_text
    from prunetune.data.tasks import split_labelled, subsample
    from prunetune.manifest import build_manifest
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
    _console().print(_table(f"eval {model}", rows))
    config = {"model": model, "ppl": ppl, "task": task, "pppl": pppl, "speed": speed, "split": split, "seqlen": seqlen,
              "max_windows": max_windows, "batch_size": batch_size, "max_length": max_length,
              "max_examples": max_examples, "max_sentences": max_sentences, "data_dir": dd,
              "harness": harness, "harness_limit": harness_limit}
    _write_json(json_out, build_manifest("eval", config, seed=seed, metrics=results, timings={"total_s": total},
                                         extra={"model": model}))


def _check_classifier(spec: str, label_names: list[str]) -> bool:
    """True when `spec` is a trained classifier for these labels; a mismatch is an error, not a silent new head."""
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


# ------------------------------------------------------------------------------------------------ prune
PRUNE_FLAGS = {  # flag parameter -> recipe key (no defaults here: commands/prune.yaml and PruneSpec hold them)
    "method": "prune.method", "sparsity": "prune.sparsity", "pattern": "prune.pattern",
    "granularity": "prune.granularity", "calib": "data.calib", "calib_split": "data.calib_split",
    "nsamples": "prune.nsamples", "seqlen": "prune.seqlen", "skip": "prune.skip", "device": "prune.device",
    "calib_batch": "prune.calib_batch", "max_windows": "eval.max_windows", "seed": "seed",
    "data_dir": "data.data_dir", "stream": "prune.stream", "max_memory": "prune.max_memory",
    "dtype": "model.dtype",
    "data_dir": "data.data_dir", "layer_sparsity": "prune.layer_sparsity", "owl_lambda": "prune.owl_lambda",
    "owl_m": "prune.owl_m", "refine": "prune.refine", "admm_iters": "prune.admm_iters", "admm_damp": "prune.admm_damp",
}


def _default_calib_split(data: dict, calib_split: str | None) -> None:
    """Without `--calib-split`, the calibration source's usual split (WikiText-2 has no train split: valid)."""
    if calib_split is None:
        from prunetune.config import DataSpec
        from prunetune.pruning.api import default_calib_split

        d = data.setdefault("data", {})
        d["calib_split"] = default_calib_split(d.get("calib", DataSpec.model_fields["calib"].default))


@app.command("prune", epilog="Flags left out keep the values of the command's recipe; --print-recipe shows every "
             "value.")
def prune_cmd(
    model: str = typer.Argument(..., help="alias, HF dir, .gguf or hub id"),
    method: Optional[str] = typer.Option(None, "--method", help="a registered criterion: magnitude | wanda | sparsegpt | admm | owl-admm | l1-global | l2-cols (recipe default: wanda)"),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="fraction of weights to prune, in [0, 1) (recipe default: 0.5)"),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="N:M semi-structured pattern, e.g. 2:4 (overrides --sparsity)"),
    granularity: Optional[str] = typer.Option(None, "--granularity", help="row | layer | global | rows | cols | heads | neurons (default: sparsegpt layer, others row)"),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration text: bbc-news | wikitext2 | FILE (.txt/.csv/.jsonl)"),
    calib_split: Optional[str] = typer.Option(None, "--calib-split", help="split of --calib (default: valid for wikitext2, else train)"),
    nsamples: Optional[int] = typer.Option(None, "--nsamples", min=1, help="calibration windows (recipe default: 32)"),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", min=2, help="tokens per calibration (and --eval-ppl) window (recipe default: 512)"),
    skip: Optional[list[str]] = typer.Option(None, "--skip", help="regex of module names to leave dense (repeatable)"),
    device: Optional[str] = typer.Option(None, "--device", help="calibration device: cpu | cuda (the model stays on CPU; streaming: one block at a time on it)"),
    calib_batch: Optional[int] = typer.Option(None, "--calib-batch", min=1, help="calibration windows per block forward (memory vs speed; recipe default: 4)"),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream", help="read, prune and write one block at a time from a local safetensors dir (default: when the model would not fit --max-memory)"),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="memory budget that decides streaming, e.g. 16GB (default: what the machine has free)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto | bf16 | fp16 | fp32: load, prune and export dtype (recipe default: auto, the checkpoint's)"),
    layer_sparsity: Optional[str] = typer.Option(None, "--layer-sparsity", help="uniform | owl: each block its own sparsity from its activation outliers, the mean kept (default: the method's, owl for owl-admm)"),
    owl_lambda: Optional[float] = typer.Option(None, "--owl-lambda", help="OWL: half-width of the per-block sparsity band (recipe default: 0.08)"),
    owl_m: Optional[float] = typer.Option(None, "--owl-m", help="OWL: an outlier scores above M x its block's mean (recipe default: 5)"),
    refine: Optional[str] = typer.Option(None, "--refine", help="none | dsnot: prune-and-grow swaps after the criterion (calibrated criteria)"),
    admm_iters: Optional[int] = typer.Option(None, "--admm-iters", help="ADMM iterations (recipe default: 20)"),
    admm_damp: Optional[float] = typer.Option(None, "--admm-damp", help="ADMM dampening, fraction of mean(diag XᵀX) (recipe default: 0.1)"),
    eval_ppl: Optional[str] = typer.Option(None, "--eval-ppl", help="perplexity before and after (windows of --seqlen) on wikitext2 | bbc-news | FILE"),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", min=1, help="--eval-ppl: first N windows only"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed of the calibration sample"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="local WikiText-2 dir (else PRUNETUNE_DATA_DIR or hub)"),
    print_recipe: bool = typer.Option(False, "--print-recipe", help="print the recipe this command runs (YAML) and exit"),
    resume: bool = typer.Option(False, "--resume", help="continue OUT: complete stages are skipped"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --out"),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory: the plain HF model + masks.safetensors land in OUT/model"),
) -> None:
    """Prune a model one-shot (magnitude, Wanda, SparseGPT) and save it as a plain HF directory with its masks.

    A one-stage recipe (prune, export; evaluate before and after with --eval-ppl) run like `prunetune run`.
    """
    _quiet_libraries()
    from prunetune.data.sources import load_text
    from prunetune.models.loading import natural_task
    from prunetune.pruning.api import validate
    from prunetune.pruning.criteria import get_criterion

    from prunetune.config import PruneSpec

    flags = {k: v for k, v in locals().items() if k in PRUNE_FLAGS}
    flags["skip"] = list(skip) if skip else None
    if device not in (None, "cpu") and not str(device).startswith("cuda"):  # the flag's name in the message
        raise PrunetuneError(f"unknown --device '{device}'; choose cpu or cuda")
    data = command_data("prune", model, flags)
    # everything that can be checked without the model is checked first (the engine's own messages)
    p = {**{k: f.default for k, f in PruneSpec.model_fields.items()}, **data.get("prune", {})}
    opts = {"iters": p["admm_iters"], "damp": p["admm_damp"]} if hasattr(get_criterion(p["method"]), "check") else None
    validate(p["method"], p["sparsity"], p["pattern"], p["granularity"], layer_sparsity=p["layer_sparsity"],
             owl_lambda=p["owl_lambda"], owl_m=p["owl_m"], refine=p["refine"], options=opts)
    _default_calib_split(data, calib_split)
    d = data["data"]
    if eval_ppl:
        d.update(ppl=[eval_ppl], ppl_split="test")
        data.setdefault("eval", {})["ppl_seqlen"] = p["seqlen"]
        data["stages"] = ["evaluate", "prune", "evaluate", "export"]
    recipe = validated_command_recipe("prune", data, flags)
    spec = recipe.prune
    if print_recipe:
        _print_recipe(recipe)
        return
    if out is None:
        raise PrunetuneError("prune needs --out (or --print-recipe)")
    if spec.device and spec.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise PrunetuneError("--device cuda asked but no CUDA device is available")
    dd = recipe.data.data_dir
    if get_criterion(spec.method).needs_calibration or spec.extras()["layer_sparsity"] == "owl":
        load_text(recipe.data.calib, recipe.data.calib_split, data_dir=dd)
    if eval_ppl:
        load_text(eval_ppl, "test", data_dir=dd)
        nat_task, _ = natural_task(model)
        if nat_task != "causal-lm":
            raise PrunetuneError(f"--eval-ppl needs a causal LM; {model} is a {nat_task} model")
    from prunetune.pipelines.stages import streaming_checkpoint

    if not resume and streaming_checkpoint(model, recipe, spec, out) is not None and eval_ppl:
        raise PrunetuneError("--eval-ppl loads the whole model, which this run streams because it does not fit "
                             "(or --stream); evaluate the pruned model with `prunetune eval` where it fits")
    out = _claim_out(out)
    from prunetune.pruning.calibrate import bound_heap_growth

    bound_heap_growth()  # this process only prunes (and evaluates): free tensors go back to the OS at once
    con = _console()
    man = run_and_report(recipe, out, resume=resume, overwrite=overwrite, con=con)
    names = recipe.stage_names()
    pruned = man["metrics"][next(n for n in names if n.endswith("-prune"))]
    gran = pruned["prune_seconds"]["protocol"]["granularity"]
    rows = [("method", spec.method + (f" {spec.pattern}" if spec.pattern else f" {spec.sparsity:.0%} ({gran})")),
            ("real-zero sparsity (prunable linears)", f"{pruned['sparsity']['value']:.4%}"),
            ("prune seconds", f"{pruned['prune_seconds']['value']:.1f}")]
    evals = [n for n in names if n.endswith("-evaluate")]
    for tag, stage in zip(("before", "after"), evals):
        for key, m in man["metrics"][stage].items():
            if key.startswith("ppl/"):
                p = m["protocol"]
                rows.append((f"perplexity {tag} ({p['dataset']}, {p['windows']} x {p['seqlen']})",
                             f"{m['value']:.4f}"))
    rows.append(("saved", str(out / "model")))
    con.print(_table(f"prune {model}", rows))


# ------------------------------------------------------------------------------------------------ shrink (owner: vib)
SHRINK_FLAGS = {  # flag parameter -> recipe key (no defaults here: commands/shrink.yaml and StructuredSpec hold them)
    "method": "structured.method", "sparsity": "structured.sparsity", "structures": "structured.structures",
    "round_to": "structured.round_to", "calib": "data.calib", "calib_split": "data.calib_split",
    "nsamples": "structured.nsamples", "seqlen": "structured.seqlen", "vib_steps": "structured.vib_steps",
    "vib_batch": "structured.vib_batch", "vib_lr": "structured.vib_lr", "vib_loss": "structured.vib_loss",
    "vib_widths": "structured.vib_widths", "vib_center": "structured.vib_center",
    "vib_neuron_ranking": "structured.vib_neuron_ranking",
    "lagrangian_warmup": "structured.lagrangian_warmup", "lagrangian_lr": "structured.lagrangian_lr",
    "att_mul": "structured.att_mul",
    "max_windows": "eval.max_windows", "seed": "seed", "data_dir": "data.data_dir",
}


@app.command("shrink", epilog="Flags left out keep the values of the command's recipe; --print-recipe shows every "
             "value.")
def shrink_cmd(
    model: str = typer.Argument(..., help="alias, HF dir, .gguf or hub id (Llama family)"),
    method: Optional[str] = typer.Option(None, "--method", help="vib | l1 | l2 | wanda | flap"),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="fraction of block parameters removed, in [0, 1)"),
    structures: Optional[str] = typer.Option(None, "--structures", help="comma list of heads, neurons, hidden"),
    round_to: Optional[int] = typer.Option(None, "--round-to", help="kept neuron / hidden widths are multiples of this"),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration / gate-training text source"),
    calib_split: Optional[str] = typer.Option(None, "--calib-split", help="default: valid for wikitext2, else train"),
    nsamples: Optional[int] = typer.Option(None, "--nsamples", help="calibration windows"),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", help="tokens per window"),
    vib_steps: Optional[int] = typer.Option(None, "--vib-steps", help="VIB gate-training steps"),
    vib_batch: Optional[int] = typer.Option(None, "--vib-batch", help="windows per VIB step"),
    vib_lr: Optional[float] = typer.Option(None, "--vib-lr", help="VIB_LR: learning rate of the gates' log sigma^2"),
    vib_loss: Optional[str] = typer.Option(None, "--vib-loss", help="gate objective: kd (KL to the dense model) or lm"),
    vib_widths: Optional[str] = typer.Option(None, "--vib-widths", help="uniform (baselines' rule) or learned (VIB's KV count)"),
    vib_center: Optional[bool] = typer.Option(None, "--vib-center/--no-vib-center", help="gates on each structure's "
                                              "deviation from its calibration mean (a removed one leaves its mean as a bias)"),
    vib_neuron_ranking: Optional[str] = typer.Option(None, "--vib-neuron-ranking", help="vib (the gates) or flap "
                                                     "(FLAP's fluctuation ranks neurons, the gates KV groups)"),
    lagrangian_warmup: Optional[float] = typer.Option(None, "--lagrangian-warmup", help="fraction of steps the target ramps over"),
    lagrangian_lr: Optional[float] = typer.Option(None, "--lagrangian-lr", help="learning rate of the Lagrange multipliers"),
    att_mul: Optional[float] = typer.Option(None, "--att-mul", help="weight of attention parameters in the sparsity count"),
    eval_ppl: bool = typer.Option(False, "--eval-ppl", help="perplexity (WikiText-2 test) before and after"),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="--eval-ppl: first N windows of 512 tokens"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed of the calibration sample and the gates"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="local WikiText-2 dir (else PRUNETUNE_DATA_DIR or hub)"),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory; the shrunk plain HF model lands in OUT/model"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --out"),
    resume: bool = typer.Option(False, "--resume", help="continue OUT: complete stages are skipped"),
    print_recipe: bool = typer.Option(False, "--print-recipe", help="print the recipe this command runs and exit"),
) -> None:
    """Structured pruning that shrinks the model (VIB or L1/L2/Wanda/FLAP): fewer heads, neurons, hidden channels."""
    _quiet_libraries()
    flags = {k: v for k, v in locals().items() if k in SHRINK_FLAGS}
    if structures is not None:
        flags["structures"] = [s.strip() for s in structures.split(",") if s.strip()]
    data = command_data("shrink", model, flags)
    _default_calib_split(data, calib_split)
    if eval_ppl:
        data["stages"] = ["evaluate", "structured", "evaluate", "export"]
    rec = validated_command_recipe("shrink", data, flags)
    if print_recipe:
        _print_recipe(rec)
        return
    if out is None:
        raise PrunetuneError("shrink needs --out (or --print-recipe)")
    out = _claim_out(out)
    con = _console()
    run_and_report(rec, out, resume=resume, overwrite=overwrite, con=con)
    con.print(f"shrunk model: {out / 'model'}   report: {out / 'report.md'}")


# ------------------------------------------------------------------------------------------------ finetune / payt
# A command is a one-stage recipe: its starting point is a recipe file (pipelines/recipes/commands/NAME.yaml),
# every flag given overrides one key of it, and the pydantic specs validate the result. No option has a
# default in this file: a flag left out keeps the recipe's value (`--print-recipe` shows them all).
TUNE_FLAGS = {  # flag parameter -> recipe key
    "task": "data.train", "task_type": "model.task", "lora_rank": "tune.lora_rank", "lora_alpha": "tune.lora_alpha",
    "lora_dropout": "tune.lora_dropout", "rslora": "tune.rslora", "kd": "tune.kd", "kd_alpha": "tune.kd_alpha",
    "kd_temp": "tune.kd_temp", "teacher": "tune.teacher", "epochs": "tune.epochs", "lr": "tune.lr",
    "batch_size": "tune.batch_size", "max_length": "tune.seqlen", "n_samples": "tune.n_samples",
    "eval_samples": "tune.eval_samples", "test_samples": "tune.test_samples", "seed": "seed",
    "split_seed": "data.split_seed", "mix": "tune.mix.fraction", "mix_source": "tune.mix.source",
    "mix_strategy": "tune.mix.strategy", "mix_sampling": "tune.mix.sampling", "data_dir": "data.data_dir",
    "retention": "tune.retention", "retention_windows": "tune.retention_windows", "save_steps": "tune.save_steps",
}
PAYT_FLAGS = {"sparsity": "payt.sparsity", "schedule": "payt.schedule", "start": "payt.start", "end": "payt.end",
              "every": "payt.every", "criterion": "payt.criterion"}
LOSPARSE_FLAGS = {"rank_ratio": "losparse.rank_ratio", "keep": "losparse.keep",
                  "initial_threshold": "losparse.initial_threshold", "warmup_steps": "losparse.warmup_steps",
                  "initial_warmup": "losparse.initial_warmup", "final_warmup": "losparse.final_warmup",
                  "initial_warmup_steps": "losparse.initial_warmup_steps",
                  "final_warmup_steps": "losparse.final_warmup_steps", "delta_t": "losparse.deltaT",
                  "beta1": "losparse.beta1", "beta2": "losparse.beta2",
                  "structured_method": "losparse.structured_method",
                  "structured_direction": "losparse.structured_direction", "distill_from": "losparse.teacher",
                  "kd_weight": "losparse.kd_weight", "layer_weight": "losparse.layer_weight",
                  "distill_temp": "losparse.kd_temp"}
COMMAND_FLAGS = {"prune": PRUNE_FLAGS, "finetune": TUNE_FLAGS, "payt": {**TUNE_FLAGS, **PAYT_FLAGS},
                 "losparse": {**TUNE_FLAGS, **LOSPARSE_FLAGS}, "shrink": SHRINK_FLAGS}
ALL_SAMPLES = ("n_samples", "eval_samples", "test_samples")  # 0 on the command line = all of them


def run_and_report(rec, out: Path, *, resume: bool, overwrite: bool, con) -> dict:
    """Run a recipe through the runner, then write its report (the runner does not import reporting; under a
    multi-process launcher, rank 0 writes it)."""
    from prunetune.pipelines.runner import is_main_process, run_recipe
    from prunetune.reporting.report import write_run_report
    from prunetune.rundir import RunLock

    lock = RunLock(out).acquire() if is_main_process() else None  # the report is written under the run's lock too
    try:
        man = run_recipe(rec, out, resume=resume, overwrite=overwrite,
                         log=lambda msg: con.print(msg, highlight=False, soft_wrap=True))
        if is_main_process():
            write_run_report(out)
    finally:
        if lock is not None:
            lock.release()
    return man


def command_data(command: str, model: str, flags: dict, extra: dict | None = None, base: str | None = None) -> dict:
    """The raw recipe a command runs, before validation: its recipe file (or the preset `base`, run as this
    command's stages) + the flags that were given."""
    from prunetune.config import COMMANDS_DIR, read_recipe_file

    data, _ = read_recipe_file(str(COMMANDS_DIR / f"{command}.yaml"))
    if base is not None:
        stages = data["stages"]
        data, _ = read_recipe_file(base)
        data["stages"] = stages
    data["model"] = {**data.get("model", {}), "name": model}
    mapping = COMMAND_FLAGS[command]
    for name, value in flags.items():
        if value is None or name not in mapping:
            continue
        if name in ALL_SAMPLES and value == 0:
            value = None
        if name == "data_dir":
            value = str(value)
        cur = data
        *parents, last = mapping[name].split(".")
        for part in parents:
            cur = cur.setdefault(part, {})
        cur[last] = value
    lora = flags.get("lora")
    if lora is not None:
        data.setdefault("tune", {})["mode"] = "lora" if lora else "full"
    for key, value in (extra or {}).items():
        section, field = key.split(".")
        data.setdefault(section, {})[field] = value
    return data


def validated_command_recipe(command: str, data: dict, flags: dict):
    """`data` validated; an error names the flag the user typed, not only the recipe key it sets."""
    from prunetune.config import validate_recipe

    mapping = COMMAND_FLAGS[command]
    try:
        return validate_recipe(data, command)
    except PrunetuneError as exc:
        msg = str(exc)
        for name, key in sorted(mapping.items(), key=lambda kv: -len(kv[1])):
            if flags.get(name) is not None and f" {key}:" in msg:
                msg = msg.replace(f" {key}:", f" --{name.replace('_', '-')} ({key}):", 1)
                break
        raise PrunetuneError(msg) from None


def command_recipe(command: str, model: str, flags: dict, extra: dict | None = None, base: str | None = None):
    """The validated one-stage recipe a command runs (`command_data`, then `validated_command_recipe`)."""
    return validated_command_recipe(command, command_data(command, model, flags, extra, base), flags)


def _print_recipe(recipe) -> None:
    import yaml

    from prunetune.config import recipe_to_dict

    sys.stdout.write(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))


def _print_run(title: str, r: dict) -> None:
    rows: list[tuple[str, str]] = [("train examples", str(r["train_examples"])), ("steps", str(r["global_step"]))]
    for key, label in (("test_before_merge", "before merge"), ("test_after_merge", "after merge (exported)")):
        m = r.get(key) or {}
        if "accuracy" in m:
            rows.append((f"accuracy / macro-F1 {label}", f"{m['accuracy']:.4f} / {m['macro_f1']:.4f}"))
        elif "perplexity" in m:
            rows.append((f"test perplexity {label}", f"{m['perplexity']:.3f}"))
    rows.append(("sparsity (real zeros of prunable linears)", f"{r.get('sparsity', 0.0):.4%}"))
    if r.get("retention"):
        rows.append((f"retention: {r['retention']['metric']}", f"{r['retention']['value']:.4f}"))
    me = r.get("mask_enforcement", {})
    if me.get("steps"):
        rows.append(("mask enforcement / step", f"{me['enforce_ms_per_step']:.1f} ms ({me['overhead_fraction']:.2%})"))
    rows.append(("train seconds", f"{r['timings']['train_s']:.1f}"))
    _console().print(_table(title, rows))


def run_tuning_command(recipe, title: str, out: Path, *, resume: bool, overwrite: bool) -> dict:
    """A finetune/payt recipe through the runner, like `prunetune run`; OUT/metrics.json is the stage's result.

    Under a multi-process launcher (torchrun, accelerate launch) every rank runs the same recipe through the
    runner, which trains the stage on all ranks together and lets rank 0 alone write, report and print.
    """
    from prunetune.pipelines.runner import is_main_process
    from prunetune.rundir import atomic_write_json

    out = _claim_out(out)
    run_and_report(recipe, out, resume=resume, overwrite=overwrite, con=_console())
    if not is_main_process():
        return {}
    stage = out / "stages" / recipe.stage_names()[0]
    r = json.loads((stage / "tune" / "metrics.json").read_text())
    atomic_write_json(out / "metrics.json", r)
    _print_run(title, r)
    return r


def full_evaluate_recipe(recipe, full_lr: float | None):
    """`payt --full-evaluate`: the payt command's recipe with one stage per configuration of the comparison
    (`methods.payt.CONFIGURATIONS`; "original" only when retention is measured), each from the recipe's model,
    then the table stage. Same settings, same seed: `--print-recipe` prints it, `--resume` continues it."""
    from prunetune.config import recipe_to_dict, validate_recipe
    from prunetune.methods.payt import CONFIGURATIONS

    data = recipe_to_dict(recipe)
    runs = [r for r in CONFIGURATIONS if r != "original" or recipe.tune.retention]
    data.update(name=f"{recipe.name}-full-evaluate",
                description="`prunetune payt --full-evaluate`: the seed's eight configurations (dense full/LoRA FT, "
                            "prune without FT, prune -> full/LoRA FT, PAYT, PAYT without KD, the other LoRA scaling) "
                            "from the same model, data, split, seed and budget, then one table (full_evaluate.md / "
                            ".json in the run directory).",
                full_evaluate={"full_lr": full_lr},
                stages=[{"type": "full_evaluate", "name": r, "run": r} for r in (*runs, "table")])
    return validate_recipe(data, "payt --full-evaluate")


# The options finetune and payt share: one definition each (typer reads the flag names and help from these).
_Opt = typer.Option
Task = Annotated[Optional[str], _Opt("--task", help="task data: bbc-news | .csv/.jsonl (text,label) | text source")]
TaskType = Annotated[Optional[str], _Opt("--task-type", help="seq-cls (labelled data) or causal-lm (plain text)")]
Lora = Annotated[Optional[bool], _Opt("--lora/--full", "--use-lora/--no-use-lora", help="LoRA adapters or full FT")]
LoraRank = Annotated[Optional[int], _Opt("--lora-rank")]
LoraAlpha = Annotated[Optional[float], _Opt("--lora-alpha", help="LoRA scale numerator (recipe default: 2 x rank)")]
LoraDropout = Annotated[Optional[float], _Opt("--lora-dropout")]
Rslora = Annotated[Optional[bool], _Opt("--rslora/--no-rslora", "--use-rs-lora/--no-use-rs-lora",
                                        help="rank-stabilised scaling alpha/sqrt(r)")]
Kd = Annotated[Optional[bool], _Opt("--kd/--no-kd", "--use-kd/--no-use-kd", help="distil from a teacher")]
KdAlpha = Annotated[Optional[float], _Opt("--kd-alpha", help="weight of CE; 1-alpha weighs the KL term")]
KdTemp = Annotated[Optional[float], _Opt("--kd-temp", help="softmax temperature T")]
Teacher = Annotated[Optional[str], _Opt("--teacher", help="initial | dense | PATH")]
Epochs = Annotated[Optional[float], _Opt("--epochs", "--num-epochs")]
Lr = Annotated[Optional[float], _Opt("--lr", help="recipe default: 1e-3 (LoRA) / 1e-4 (full)")]
BatchSize = Annotated[Optional[int], _Opt("--batch-size")]
MaxLength = Annotated[Optional[int], _Opt("--max-length")]
NSamples = Annotated[Optional[int], _Opt("--n-samples", help="training examples (0 = all)")]
EvalSamples = Annotated[Optional[int], _Opt("--eval-samples", help="validation examples per epoch (0 = all)")]
TestSamples = Annotated[Optional[int], _Opt("--test-samples", help="test examples scored (0 = the whole test split)")]
Seed = Annotated[Optional[int], _Opt("--seed", help="training seed (adapter init, data order); not the split")]
SplitSeed = Annotated[Optional[int], _Opt("--split-seed", help="seed of the fixed train/validation/test split")]
Mix = Annotated[Optional[float], _Opt("--mix", "--dataset-mix-ptg", help="fraction of general text mixed in")]
MixSource = Annotated[Optional[str], _Opt("--mix-source")]
MixStrategy = Annotated[Optional[str], _Opt("--mix-strategy", "--dataset-mix-strategy", help="random | old_first")]
MixSampling = Annotated[Optional[str], _Opt("--mix-sampling", "--dataset-sampling-strategy", help="first | random")]
DataDir = Annotated[Optional[Path], _Opt("--data-dir", help="local WikiText-2 dir")]
Retention = Annotated[Optional[bool], _Opt("--retention/--no-retention", help="measure knowledge retention")]
RetentionWindows = Annotated[Optional[int], _Opt("--retention-windows", min=1)]
PrintRecipe = Annotated[bool, _Opt("--print-recipe", help="print the recipe this command runs (YAML) and exit")]
Resume = Annotated[bool, _Opt("--resume", help="continue OUT: complete stages are skipped, an interrupted training "
                              "continues from its last checkpoint")]
SaveSteps = Annotated[Optional[int], _Opt("--save-steps", min=1, help="also checkpoint every N optimizer steps "
                                          "(what --resume continues from; default: each epoch end)")]
Overwrite = Annotated[bool, _Opt("--overwrite", help="replace a non-empty OUT")]
Out = Annotated[Optional[Path], _Opt("--out", help="run directory (OUT/model, OUT/metrics.json, OUT/manifest.json)")]
_NOT_FLAGS = ("model", "print_recipe", "resume", "overwrite", "out")
_RECIPE_NOTE = "Flags left out keep the values of the command's recipe; --print-recipe shows every value."


@app.command(epilog=_RECIPE_NOTE)
def finetune(
    model: str = typer.Argument(..., help="alias, HF dir (a pruned one keeps its masks), .gguf or hub id"),
    task: Task = None, task_type: TaskType = None, lora: Lora = None, lora_rank: LoraRank = None,
    lora_alpha: LoraAlpha = None, lora_dropout: LoraDropout = None, rslora: Rslora = None, kd: Kd = None,
    kd_alpha: KdAlpha = None, kd_temp: KdTemp = None, teacher: Teacher = None, epochs: Epochs = None, lr: Lr = None,
    batch_size: BatchSize = None, max_length: MaxLength = None, n_samples: NSamples = None,
    eval_samples: EvalSamples = None, test_samples: TestSamples = None, seed: Seed = None,
    split_seed: SplitSeed = None, mix: Mix = None, mix_source: MixSource = None, mix_strategy: MixStrategy = None,
    mix_sampling: MixSampling = None, data_dir: DataDir = None, retention: Retention = None,
    retention_windows: RetentionWindows = None, save_steps: SaveSteps = None, print_recipe: PrintRecipe = False,
    resume: Resume = False, overwrite: Overwrite = False, out: Out = None,
) -> None:
    """Fine-tune (LoRA/rsLoRA or full) with knowledge distillation; pruned weights stay zero."""
    _quiet_libraries()
    flags = {k: v for k, v in locals().items() if k not in _NOT_FLAGS}
    recipe = command_recipe("finetune", model, flags)
    if print_recipe:
        _print_recipe(recipe)
        return
    if out is None:
        raise PrunetuneError("finetune needs --out (or --print-recipe)")
    run_tuning_command(recipe, f"finetune {model} -> {out}", out, resume=resume, overwrite=overwrite)


@app.command(epilog=_RECIPE_NOTE)
def payt(
    model: str = typer.Argument(..., help="alias, HF dir, .gguf or hub id"),
    task: Task = None, task_type: TaskType = None,
    sparsity: Optional[float] = typer.Option(None, "--sparsity", "--sparsity-target", help="target sparsity in [0, 1)"),
    schedule: Optional[str] = typer.Option(None, "--schedule", "--pruning-schedule", help="oneshot | linear | agp"),
    start: Optional[float] = typer.Option(None, "--start", "--start-pruning-epoch-ptg", help="fraction of training before pruning"),
    end: Optional[float] = typer.Option(None, "--end", help="fraction of training by which the target is reached (1: the last event that fits)"),
    every: Optional[int] = typer.Option(None, "--every", "--prune-every-epoch", help="prune every N epochs"),
    every_steps: Optional[int] = typer.Option(None, "--every-steps", help="prune every N optimizer steps instead"),
    criterion: Optional[str] = typer.Option(None, "--criterion", "--pruning-method", help="l1-global | l2-cols | wanda"),
    lora: Lora = None, lora_rank: LoraRank = None, lora_alpha: LoraAlpha = None, lora_dropout: LoraDropout = None,
    rslora: Rslora = None, kd: Kd = None, kd_alpha: KdAlpha = None, kd_temp: KdTemp = None, teacher: Teacher = None,
    epochs: Epochs = None, lr: Lr = None,
    full_lr: Optional[float] = typer.Option(None, "--full-lr", help="--full-evaluate: learning rate of the dense full-FT baseline (default 1e-4; --lr is for the LoRA runs)"),
    batch_size: BatchSize = None, max_length: MaxLength = None, n_samples: NSamples = None,
    eval_samples: EvalSamples = None, test_samples: TestSamples = None, seed: Seed = None,
    split_seed: SplitSeed = None, mix: Mix = None, mix_source: MixSource = None, mix_strategy: MixStrategy = None,
    mix_sampling: MixSampling = None, data_dir: DataDir = None, retention: Retention = None,
    retention_windows: RetentionWindows = None, save_steps: SaveSteps = None,
    full_evaluate: bool = typer.Option(False, "--full-evaluate/--no-full-evaluate", help="run the seed's eight configurations (dense full/LoRA FT, prune without FT, prune -> full/LoRA FT, PAYT, PAYT without KD, other LoRA scaling) into one table"),
    paper_defaults: bool = typer.Option(False, "--paper-defaults", help="start from the payt-paper preset (the seed's defaults: rank 32, alpha 32, dropout 0.1, rsLoRA, linear from 0, 5 epochs, 512 tokens, 1,000 samples)"),
    print_recipe: PrintRecipe = False, resume: Resume = False, overwrite: Overwrite = False, out: Out = None,
) -> None:
    """Prune-As-You-Tune: prune the base weights on a schedule during (LoRA) fine-tuning with KD."""
    _quiet_libraries()
    if every_steps is not None and every_steps < 1:
        raise PrunetuneError(f"--every-steps must be >= 1, got {every_steps}")
    flags = {k: v for k, v in locals().items() if k not in (*_NOT_FLAGS, "full_lr", "full_evaluate", "paper_defaults")}
    extra = {"payt.every": every_steps, "payt.unit": "step"} if every_steps else {}
    recipe = command_recipe("payt", model, flags, extra, base="payt-paper" if paper_defaults else None)
    if full_evaluate:
        recipe = full_evaluate_recipe(recipe, full_lr)
    if print_recipe:
        _print_recipe(recipe)
        return
    if out is None:
        raise PrunetuneError("payt needs --out (or --print-recipe)")
    if full_evaluate:  # eight runs compared in one table: a multi-stage recipe, run like any other
        from prunetune.pipelines.runner import is_main_process

        out = _claim_out(out)
        con = _console()
        run_and_report(recipe, out, resume=resume, overwrite=overwrite, con=con)
        if is_main_process():
            con.print((out / "full_evaluate.md").read_text(), markup=False, highlight=False)
            con.print(f"written: {out / 'full_evaluate.md'} and {out / 'full_evaluate.json'}")
        return
    run_tuning_command(recipe, f"payt {model} -> {out}", out, resume=resume, overwrite=overwrite)


# ------------------------------------------------------------------------------------------------ losparse
@app.command(epilog=_RECIPE_NOTE)
def losparse(
    model: str = typer.Argument(..., help="alias, HF dir or hub id"),
    task: Optional[str] = typer.Option(None, "--task", help="task data: bbc-news | .csv/.jsonl (text,label) | text source"),
    task_type: TaskType = None,
    rank_ratio: Optional[float] = typer.Option(None, "--rank-ratio", "--low-rank-parameter-ratio", help="share of each matrix in U and V, in (0, 1): rank = ceil(p*m*n/(m+n))"),
    keep: Optional[float] = typer.Option(None, "--keep", "--final-threshold", help="fraction of S's entries kept at the end, in (0, 1)"),
    initial_threshold: Optional[float] = typer.Option(None, "--initial-threshold", help="kept fraction of S before pruning"),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="the unit of --initial-warmup / --final-warmup"),
    initial_warmup: Optional[float] = typer.Option(None, "--initial-warmup", help="plain fine-tuning before pruning, in warmup steps"),
    final_warmup: Optional[float] = typer.Option(None, "--final-warmup", help="steps with the mask fixed at the end, in warmup steps"),
    initial_warmup_steps: Optional[int] = typer.Option(None, "--initial-warmup-steps", help="the same as a plain step count"),
    final_warmup_steps: Optional[int] = typer.Option(None, "--final-warmup-steps", help="the same as a plain step count"),
    delta_t: Optional[int] = typer.Option(None, "--delta-t", "--deltaT", help="recompute the mask every N steps"),
    beta1: Optional[float] = typer.Option(None, "--beta1", help="EMA of the sensitivity |θ·∇θ|"),
    beta2: Optional[float] = typer.Option(None, "--beta2", help="EMA of its uncertainty"),
    structured_method: Optional[str] = typer.Option(None, "--structured-method", "--structured_method", help="mean | sum | max | min (rows/columns of S) | none (unstructured)"),
    structured_direction: Optional[str] = typer.Option(None, "--structured-direction", "--structured_direction", help="row | col | row_col"),
    distill_from: Optional[str] = typer.Option(None, "--distill-from", "--teacher-path", help="dense fine-tuned model dir to distil from"),
    kd_weight: Optional[float] = typer.Option(None, "--kd-weight", help="weight of T^2*KL on the logits (needs --distill-from)"),
    layer_weight: Optional[float] = typer.Option(None, "--layer-weight", help="weight of the layer-output MSE (needs --distill-from)"),
    distill_temp: Optional[float] = typer.Option(None, "--distill-temp", help="temperature of the logit KD"),
    epochs: Optional[float] = typer.Option(None, "--epochs", "--num-epochs", "--num_train_epochs"),
    lr: Optional[float] = typer.Option(None, "--lr", "--learning-rate", "--learning_rate"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "--per-device-train-batch-size"),
    max_length: Optional[int] = typer.Option(None, "--max-length", "--max-seq-length"),
    n_samples: Optional[int] = typer.Option(None, "--n-samples", help="training examples (0 = all)"),
    eval_samples: Optional[int] = typer.Option(None, "--eval-samples"),
    test_samples: Optional[int] = typer.Option(None, "--test-samples", help="test examples scored (0 = the whole test split)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="training seed; not the split"),
    split_seed: Optional[int] = typer.Option(None, "--split-seed", help="seed of the fixed train/validation/test split"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
    save_steps: SaveSteps = None,
    print_recipe: bool = typer.Option(False, "--print-recipe", help="print the recipe this command runs (YAML) and exit"),
    resume: bool = typer.Option(False, "--resume"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory"),
) -> None:
    """LoSparse: every projection becomes U·V + S (SVD init), S pruned by PLATON while fine-tuning; exports a
    plain HF dir and the factorised form (prunetune.load_model rebuilds it). Seed option names are aliases."""
    _quiet_libraries()
    flags = {k: v for k, v in locals().items() if k not in _NOT_FLAGS}
    recipe = command_recipe("losparse", model, flags)
    if print_recipe:
        _print_recipe(recipe)
        return
    if out is None:
        raise PrunetuneError("losparse needs --out (or --print-recipe)")
    con = _console()
    con.print(f"[bold]prunetune losparse[/bold] {model} -> {out}")
    run_and_report(recipe, _claim_out(out), resume=resume, overwrite=overwrite, con=con)


# ------------------------------------------------------------------------------------------------ run / recipes / compare
@app.command()
def run(
    recipe: str = typer.Argument("quickstart", help="preset name (see `prunetune recipes`) or a recipe YAML file"),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default: runs/<recipe>-<timestamp>)"),
    resume: bool = typer.Option(False, "--resume", help="continue OUT: complete stages are skipped, an interrupted training stage continues from its last checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty OUT"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override a recipe key: section.key=value (repeatable)"),
) -> None:
    """Run a recipe: stages in order, each atomic and resumable; ends with manifest.json and report.md."""
    _quiet_libraries()
    import datetime as _dt

    from prunetune.config import load_recipe

    rec = load_recipe(recipe, set_ or [])
    if out is None:
        if resume:
            raise PrunetuneError("--resume needs --out: the run directory to continue")
        out = Path("runs") / f"{rec.name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out = _claim_out(out)
    con = _console()
    con.print(f"[bold]prunetune run[/bold] {rec.name} -> {out}")
    man = run_and_report(rec, out, resume=resume, overwrite=overwrite, con=con)
    from prunetune.pipelines.runner import is_main_process

    if is_main_process():  # under a multi-process launcher, rank 0 reports
        con.print(f"report: {out / 'report.md'}  (stage time {sum(man['timings'].get(s, 0) for s in man['stages']):.0f} s)")


@app.command()
def recipes() -> None:
    """List the recipe presets shipped with prunetune."""
    from rich.table import Table

    from prunetune.config import load_recipe, preset_names

    t = Table(title="presets (prunetune run NAME)", header_style="bold")
    for c in ("name", "model", "stages", "description"):
        t.add_column(c)
    for name in preset_names():
        r = load_recipe(name)
        first = " ".join(r.description.split()).split(": ")[0].split(". ")[0]
        t.add_row(name, r.model.name, " > ".join(s.name or s.type for s in r.stages), first)
    _console().print(t)


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="run directories written by `prunetune run`"),
    out: Path = typer.Option(..., "--out", help="directory for report.md and plots/"),
) -> None:
    """Compare runs: one results table and PNG plots (metric vs sparsity, layers, weights, curves)."""
    from prunetune.reporting.report import compare_runs

    path = compare_runs(runs, out)
    _console().print(f"written: {path}")


# ------------------------------------------------------------------------------------------------ compose
#: options that take several values after one flag (`--attention 0.25 0.5`), as in the seed
MULTI_VALUE_OPTIONS = ("--attention", "--linear")


def _expand_multi_value(argv: list[str]) -> list[str]:
    """`--attention 0.25 0.5` -> `--attention 0.25 --attention 0.5` (click options take one value each)."""
    out: list[str] = []
    current = None
    for tok in argv:
        if tok in MULTI_VALUE_OPTIONS:
            current = tok
            out.append(tok)
            continue
        if current is not None and not tok.startswith("-") and out[-1] != current:
            out += [current, tok]
            continue
        if tok.startswith("-") and not _is_number(tok):
            current = None
        out.append(tok)
    return out


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


@app.command()
def compose(
    model: str = typer.Argument(..., help="the model to prune: alias, local HF dir (e.g. a fine-tuned classifier) or hub id"),
    task: str = typer.Option("bbc-news", "--task", help="labelled task data: bbc-news | .csv/.jsonl (text,label)"),
    attention: Optional[list[str]] = typer.Option(None, "--attention", help="fraction of heads removed, one per configuration (--attention 0.25 0.5); '0.1,0.2,...' = one per block"),
    linear: Optional[list[str]] = typer.Option(None, "--linear", help="fraction of linear weights removed (o, FFN), one per configuration"),
    n: Optional[int] = typer.Option(None, "-n", help="number of configurations (must equal the length of the lists)"),
    grid: bool = typer.Option(False, "--grid", help="every (attention, linear) combination instead of pairing"),
    attention_units: Optional[list[str]] = typer.Option(None, "--attention-unit", help="attention | cross-attention (repeatable)"),
    linear_units: Optional[list[str]] = typer.Option(None, "--linear-unit", help="o | co | gate | up | down (repeatable)"),
    attention_criterion: Optional[str] = typer.Option(None, "--attention-criterion", help="head score: l1 | l2"),
    linear_criterion: Optional[str] = typer.Option(None, "--linear-criterion", help="linear score: l1 | wanda"),
    linear_steps: Optional[int] = typer.Option(None, "--linear-steps", help="module-level steps per pruned linear"),
    attention_steps: Optional[int] = typer.Option(None, "--attention-steps", help="module-level steps per attention module"),
    module_texts: Optional[int] = typer.Option(None, "--module-texts", help="training texts captured for module-level FT"),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="module cache (default: inside --out)"),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="also fine-tune without module-level FT (the control)"),
    full: bool = typer.Option(True, "--full/--lora", help="model-level fine-tuning: full (default) or LoRA"),
    steps: Optional[int] = typer.Option(None, "--steps", help="model-level optimizer steps per configuration"),
    epochs: float = typer.Option(1.0, "--epochs", help="model-level epochs when --steps is not given"),
    n_samples: Optional[int] = typer.Option(256, "--n-samples", help="training examples"),
    eval_samples: Optional[int] = typer.Option(64, "--eval-samples", help="validation examples for the curves"),
    test_samples: Optional[int] = typer.Option(None, "--test-samples", help="test examples scored (default: the whole test split)"),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_length: int = typer.Option(64, "--max-length", help="tokens per example"),
    lr: float = typer.Option(1e-4, "--lr", help="model-level learning rate"),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default: runs/compose-<timestamp>)"),
    resume: bool = typer.Option(False, "--resume", help="continue OUT: complete stages are skipped"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty OUT"),
    print_recipe: bool = typer.Option(False, "--print-recipe", help="print the recipe YAML this command runs, and exit"),
) -> None:
    """Composable pruning: fine-tune each pruned module once, compose every configuration, fine-tune it briefly."""
    _quiet_libraries()
    import datetime as _dt

    from prunetune.config import validate_recipe

    comp: dict = {"attention": attention or [0.25, 0.5], "linear": linear or [0.3, 0.5], "n": n, "grid": grid,
                  "baseline": baseline}
    for key, val in (("attention_units", attention_units), ("linear_units", linear_units),
                     ("attention_criterion", attention_criterion), ("linear_criterion", linear_criterion),
                     ("linear_steps", linear_steps), ("attention_steps", attention_steps),
                     ("module_texts", module_texts), ("cache_dir", cache_dir)):
        if val is not None:
            comp[key] = val
    data = {"name": "compose", "seed": seed, "model": {"name": model, "task": "seq-cls"},
            "data": {"train": task, "ppl": []},
            "tune": {"mode": "full" if full else "lora", "steps": steps, "epochs": epochs, "n_samples": n_samples,
                     "eval_samples": eval_samples, "test_samples": test_samples, "batch_size": batch_size,
                     "seqlen": max_length, "lr": lr},
            "compose": comp, "stages": ["compose"]}
    rec = validate_recipe(data, "command line")
    from prunetune.pipelines.runner import check_recipe

    check_recipe(rec)
    if print_recipe:
        _print_recipe(rec)
        return
    if out is None:
        out = Path("runs") / f"compose-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    con = _console()
    con.print(f"[bold]prunetune compose[/bold] {model} -> {out}")
    run_and_report(rec, out, resume=resume, overwrite=overwrite, con=con)
    stage = sorted((out / "stages").glob("*-compose"))
    if stage:
        con.print((stage[-1] / "report.md").read_text(), markup=False, highlight=False)


# ------------------------------------------------------------------------------------------------ entry
def _click_modules() -> list:
    """click's exception modules: the real click and typer's vendored copy (typer >= 0.20) when present."""
    mods = []
    for name in ("click.exceptions", "typer._click.exceptions"):
        try:
            mods.append(__import__(name, fromlist=["ClickException"]))
        except ImportError:
            pass
    return mods


# the file-system errors a user causes (a path that cannot be written, a full disk): one line, not a traceback
_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.ENOSPC, errno.EEXIST,
                errno.EISDIR, errno.EDQUOT}


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user errors (ours and click's) become one line on stderr and exit code 2."""
    click_errors = tuple({getattr(m, "ClickException") for m in _click_modules()})
    exit_types = tuple({getattr(m, "Exit", typer.Exit) for m in _click_modules()} | {typer.Exit})
    abort_types = tuple({getattr(m, "Abort", typer.Abort) for m in _click_modules()} | {typer.Abort})
    _NEW_OUTPUTS.clear()
    try:
        args = _global_flags_first(_expand_multi_value(list(sys.argv[1:] if argv is None else argv)))
        code = app(args=args, prog_name="prunetune", standalone_mode=False)
        if code == 130:  # Ctrl-C: typer turns it into exit code 130, which this mode returns instead of exiting
            raise KeyboardInterrupt
    except PrunetuneError as exc:
        _remove_empty_outputs()
        print(f"prunetune: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in _USER_ERRNOS:
            raise
        _remove_empty_outputs()
        where = f": {exc.filename}" if exc.filename else ""
        print(f"prunetune: error: {exc.strerror or exc}{where}", file=sys.stderr)
        sys.exit(2)
    except click_errors as exc:
        msg = " ".join(exc.format_message().split())
        if msg:  # a bare `prunetune` already printed its help
            print(f"prunetune: error: {msg}", file=sys.stderr)
        sys.exit(2)
    except exit_types as exc:
        sys.exit(exc.exit_code)
    except abort_types:
        print("prunetune: aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("prunetune: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
