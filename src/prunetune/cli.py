"""Command line: thin wrappers from flags to library calls. No algorithm lives here.

Every user mistake ends as one line on stderr and exit code 2 (`main` below); tracebacks are for bugs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from prunetune.errors import PrunetuneError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Compress pre-trained transformers by pruning while fine-tuning, with honest evaluation.",
)


def _quiet_libraries() -> None:
    """Our progress bars and tables are the output; silence transformers' own bars and load reports."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers missing is reported where it is used
        pass


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
    """Family, parameter count, geometry and per-layer sparsity of a model."""
    _quiet_libraries()
    from rich.table import Table

    from prunetune.models.arch import get_adapter, nonzero_count, parameter_count
    from prunetune.models.loading import load_model
    from prunetune.pruning.masks import sparsity_report

    loaded = load_model(model, task="base" if _is_encoder_spec(model) else "causal-lm")
    adapter = get_adapter(loaded.model)
    desc = adapter.describe()
    rep = sparsity_report(loaded.model)
    params = parameter_count(loaded.model)
    payload = {"model": model, "source": loaded.source, **desc, "parameters": params,
               "nonzero_parameters": nonzero_count(loaded.model), "prunable_sparsity": rep["sparsity"],
               "layers": rep["layers"]}
    con = _console()
    con.print(_table(f"{model}", [
        ("source", loaded.source), ("family", desc["family"]), ("blocks", str(desc["blocks"])),
        ("hidden", str(desc["hidden_size"])),
        ("heads / kv heads / head_dim", f"{desc['heads']} / {desc['kv_heads']} / {desc['head_dim']}"),
        ("mlp width", str(desc["mlp_width"])), ("parameters", f"{params:,}"),
        ("non-zero parameters", f"{payload['nonzero_parameters']:,}"),
        ("prunable linears", str(len(rep["layers"]))), ("prunable sparsity", f"{rep['sparsity']:.4%}"),
    ]))
    if layers:
        t = Table(title="per-layer sparsity (real zeros)", header_style="bold")
        for c in ("layer", "role", "shape", "sparsity"):
            t.add_column(c, justify="right" if c == "sparsity" else "left")
        for name, r in rep["layers"].items():
            t.add_row(name, r["role"], "x".join(map(str, r["shape"])), f"{r['sparsity']:.2%}")
        con.print(t)
    _write_json(json_out, payload)


def _is_encoder_spec(spec: str) -> bool:
    """Encoders (no causal head) are loaded as bare models for inspection."""
    if spec in ("minilm-l6", "tiny-bert"):
        return True
    cfg = Path(spec) / "config.json"
    if cfg.is_file():
        try:
            return json.loads(cfg.read_text()).get("model_type") in ("bert", "roberta", "xlm-roberta", "distilbert")
        except json.JSONDecodeError:
            return False
    return False


# ------------------------------------------------------------------------------------------------ eval
@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="alias, HF dir, .gguf or hub id"),
    ppl: Optional[str] = typer.Option(None, "--ppl", help="perplexity on wikitext2 | bbc-news | FILE"),
    split: str = typer.Option("test", "--split", help="split of the perplexity text"),
    seqlen: int = typer.Option(512, "--seqlen", min=2, help="window length in tokens"),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", min=1, help="score only the first N windows"),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="local WikiText-2 dir (else PRUNETUNE_DATA_DIR or hub)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write all results as JSON here"),
) -> None:
    """Evaluate a model: perplexity (protocol recorded), task accuracy/F1, speed."""
    _quiet_libraries()
    from prunetune.data.sources import load_text
    from prunetune.evaluation.perplexity import perplexity
    from prunetune.models.loading import load_model

    if ppl is None:
        raise PrunetuneError("nothing to evaluate: pass --ppl SOURCE")
    results: dict = {"model": model}
    rows: list[tuple[str, str]] = []
    src = load_text(ppl, split, data_dir=str(data_dir) if data_dir else None)
    loaded = load_model(model, task="causal-lm")
    r = perplexity(loaded.model, loaded.tokenizer, src, seqlen=seqlen, max_windows=max_windows, batch_size=batch_size)
    results["perplexity"] = r
    p = r["protocol"]
    rows.append((f"ppl {p['dataset']} ({p['windows']}x{p['seqlen']})", f"{r['value']:.4f}"))
    rows.append(("ppl seconds", f"{r['seconds']:.1f}"))
    _console().print(_table(f"eval {model}", rows))
    _write_json(json_out, results)


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


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user errors (ours and click's) become one line on stderr and exit code 2."""
    click_errors = tuple({getattr(m, "ClickException") for m in _click_modules()})
    exit_types = tuple({getattr(m, "Exit", typer.Exit) for m in _click_modules()} | {typer.Exit})
    abort_types = tuple({getattr(m, "Abort", typer.Abort) for m in _click_modules()} | {typer.Abort})
    try:
        app(args=argv, prog_name="prunetune", standalone_mode=False)
    except PrunetuneError as exc:
        print(f"prunetune: error: {exc}", file=sys.stderr)
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
