"""`prunetune info`: family, head, parameters, geometry, size and per-layer sparsity of a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from prunetune.cli.app import app, quiet_libraries
from prunetune.cli.common import console, table, write_json


@app.command()
def info(
    model: Annotated[str, typer.Argument(
        help="alias (smollm2-135m, minilm-l6, tiny-llama, ...), HF dir, .gguf or hub id")],
    layers: Annotated[bool, typer.Option("--layers/--no-layers", help="print per-layer sparsity")] = True,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the result as JSON here")] = None,
) -> None:
    """Family, head, parameter count, geometry, size on disk and per-layer sparsity of a model."""
    quiet_libraries()
    from rich.table import Table

    # at run time: these load torch, which --help must not load
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
    con = console()
    con.print(table(f"{model}", rows))
    if layers:
        t = Table(title="per-layer sparsity (real zeros)", header_style="bold")
        for c in ("layer", "role", "shape", "sparsity"):
            t.add_column(c, justify="right" if c == "sparsity" else "left")
        for name, r in rep["layers"].items():
            t.add_row(name, r["role"], "x".join(map(str, r["shape"])), f"{r['sparsity']:.2%}")
        con.print(t)
    write_json(json_out, payload)
