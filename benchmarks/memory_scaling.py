"""Peak memory and time of one-shot pruning as the model grows: streaming vs in memory (vs llm-compressor).

Random Llama checkpoints of one width and 8, 16, 32, 64 blocks (`_make_random_llama.py`, written once into
--models), pruned to 50% with Wanda and SparseGPT on 8 x 256 tokens of WikiText-2 valid. Every run is a fresh
`prunetune prune` process (`--stream` or `--no-stream`), the paths alternating, and its whole-process peak is
the kernel's own high-water mark of its resident memory (`ru_maxrss` from wait4: no sampling gaps). The
streaming peak is checked against the formula README's "Large models" gives:

    embedding table + one block's weights in fp32 + the criterion's statistics + calibration activations + 0.5 GiB

    python benchmarks/memory_scaling.py --layers 8 16 32 64 --methods wanda sparsegpt \
        --json benchmarks/results/memory_scaling.json [--llmc-python .venv-llmc/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _machine import commit, cpu_model, load_average  # noqa: E402

GIB = 2**30
#: the command's glibc setting on each path (`calibrate.bound_heap_growth`); rows before it record their own
MALLOC = {"stream": "mmap threshold 1 MiB", "memory": "mmap threshold 8 MiB, trim threshold 64 MiB"}


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd` as a fresh process; its wall time, CPU time and whole-process peak RSS (ru_maxrss)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = proc.stdout.read().decode(errors="replace")
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {code}:\n{out[-3000:]}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
            "peak_rss_mb": ru.ru_maxrss / 1024, "output_tail": out[-400:]}


def formula_bytes(model_dir: Path, nsamples: int, seqlen: int, method: str) -> dict:
    """The README's bound for the streaming peak, from the checkpoint's shapes."""
    import torch

    from prunetune.pruning.stream import open_checkpoint, plan_memory

    ckpt = open_checkpoint(model_dir)
    plan = plan_memory(ckpt, torch.float32, nsamples=nsamples, seqlen=seqlen, calib_batch=4,
                       hessian=method == "sparsegpt")
    hidden = ckpt.config["hidden_size"]
    embed = sum(t.nbytes for n, t in ckpt.tensors.items() if "embed_tokens" in n)
    layers = {}
    for n, t in ckpt.tensors.items():
        if ".layers.0." in n:
            layers[n] = t
    block_fp32 = sum(4 * t.nbytes // t.dtype.itemsize for t in layers.values())
    acts = nsamples * seqlen * hidden * 4
    bound = embed + block_fp32 + acts + 512 * 2**20  # the bound: its 0.5 GB for the libraries
    return {"embedding_mb": embed / 2**20, "block_fp32_mb": block_fp32 / 2**20, "activations_mb": acts / 2**20,
            "issue_bound_mb": bound / 2**20, "plan_streaming_mb": plan.streaming / 2**20,
            "plan_in_memory_mb": plan.in_memory / 2**20, "weights_mb": ckpt.nbytes / 2**20}


def prune_cmd(model: Path, out: Path, method: str, stream: bool, nsamples: int, seqlen: int) -> list[str]:
    return [sys.executable, "-m", "prunetune.cli", "prune", str(model), "--method", method, "--sparsity", "0.5",
            "--calib", "wikitext2", "--nsamples", str(nsamples), "--seqlen", str(seqlen),
            "--stream" if stream else "--no-stream", "--out", str(out)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "prunetune-random-llama",
                    help="where the random checkpoints are (made if absent; 8 GB for the four sizes)")
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    ap.add_argument("--paths", nargs="+", default=["stream", "memory"])
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--llmc-python", default=None, help="llm-compressor's venv python: adds its run on the "
                    "largest model (see pruning_peers.py for the venv)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "memory_scaling.json")
    a = ap.parse_args()

    env = {**os.environ, "PRUNETUNE_PROGRESS": "0", "TRANSFORMERS_VERBOSITY": "error"}
    a.models.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if a.json.is_file():
        rows = json.loads(a.json.read_text()).get("rows", [])
    done = {(r["layers"], r["method"], r["path"]) for r in rows}
    models = {}
    for n in a.layers:
        d = a.models / f"llama-w1024-{n}"
        if not (d / "random_llama.json").is_file():
            shutil.rmtree(d, ignore_errors=True)
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "_make_random_llama.py"), "--layers", str(n),
                            "--out", str(d)], check=True, env=env)
        models[n] = d
    for method in a.methods:  # one method over every size first: a partial run still shows the scaling
        for n in a.layers:
            for path in (a.paths if (n + len(method)) % 2 == 0 else list(reversed(a.paths))):  # alternate order
                if (n, method, path) in done:
                    continue
                with tempfile.TemporaryDirectory(dir=a.models) as tmp:
                    out = Path(tmp) / "run"
                    if path == "llm-compressor":
                        continue
                    r = run_measured(prune_cmd(models[n], out, method, path == "stream", a.nsamples, a.seqlen), env)
                    man = json.loads((out / "manifest.json").read_text())
                    stage = man["metrics"]["01-prune"]
                    r.update(prune_stage_s=stage["prune_seconds"]["value"],
                             streamed=stage["prune_seconds"]["protocol"]["streamed"],
                             sparsity=stage["sparsity"]["value"])
                r.update(layers=n, method=method, path=path, load=load_average(), malloc=MALLOC[path],
                         machine=cpu_model(), commit=commit(),
                         model=json.loads((models[n] / "random_llama.json").read_text()),
                         formula=formula_bytes(models[n], a.nsamples, a.seqlen, method))
                r.pop("output_tail")
                rows.append(r)
                print(f"{n:>3} layers {method:<9} {path:<7} peak {r['peak_rss_mb']:8.0f} MiB  wall {r['wall_s']:7.1f} s"
                      f"  cpu {r['cpu_s']:7.1f} s (sys {r['sys_s']:.1f})", flush=True)
                _write(a.json, rows, a)
    if a.llmc_python:
        big = max(a.layers)
        for method in a.methods:
            if (big, method, "llm-compressor") in done:
                continue
            rows.append(_llmc_row(a, models[big], method, big, env))
            _write(a.json, rows, a)
    print(render(json.loads(a.json.read_text())))


def _llmc_row(a, model: Path, method: str, layers: int, env: dict) -> dict:
    """llm-compressor's oneshot on the same checkpoint and calibration ids, in its own venv, a fresh process."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from prunetune.data.calibration import calibration_samples
    from prunetune.data.sources import load_text

    with tempfile.TemporaryDirectory(dir=a.models) as tmp:
        tok = AutoTokenizer.from_pretrained(model)
        ids = calibration_samples(tok, load_text("wikitext2", "valid").text, a.nsamples, a.seqlen, 0, "wikitext2")
        calib = Path(tmp) / "calib.safetensors"
        save_file({"input_ids": ids.to(torch.long).contiguous()}, str(calib))
        js = Path(tmp) / "llmc.json"
        r = run_measured([a.llmc_python, str(ROOT / "benchmarks" / "_pruning_llmc.py"), "--model", str(model),
                          "--calib", str(calib), "--method", method, "--sparsity", "0.5", "--json", str(js)], env)
        r["llmc"] = json.loads(js.read_text())
    r.pop("output_tail")
    r.update(layers=layers, method=method, path="llm-compressor", load=load_average(), machine=cpu_model(),
             commit=commit(),
             model=json.loads((model / "random_llama.json").read_text()))
    print(f"{layers:>3} layers {method:<9} llm-compressor peak {r['peak_rss_mb']:8.0f} MiB  wall {r['wall_s']:7.1f} s",
          flush=True)
    return r


def _write(path: Path, rows: list[dict], a) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": {"cpu": cpu_model(), "cores": os.cpu_count()}, "commit": commit(),
                                "calibration": f"{a.nsamples} x {a.seqlen} tokens of wikitext2/valid, seed 0",
                                "rows": rows}, indent=2))


def render(data: dict) -> str:
    """The markdown table of a run's JSON (run_all.py renders BENCHMARKS.md's block with it; no torch import)."""
    rows = data["rows"]
    by = {(r["layers"], r["method"], r["path"]): r for r in rows}
    machines = sorted({r.get("machine", data["machine"]["cpu"]) for r in rows})
    tag = {m: chr(ord("A") + i) for i, m in enumerate(machines)} if len(machines) > 1 else {}
    where = (f"{data['machine']['cores']} cores, {machines[0]}; commit {data['commit']}" if not tag else
             f"{data['machine']['cores']}-core machines " + ", ".join(f"{t} = {m}" for m, t in tag.items())
             + " (a row's peak and CPU time compare only within one machine; the machine column says which)")
    out = [f"Calibration {data['calibration']}; {where}. Peak = whole-process `ru_maxrss`; CPU = user + system "
           "seconds.", "",
           "| method | blocks | params | streaming peak MiB | bound MiB | in-memory peak MiB | peak ratio | "
           "streaming CPU s | in-memory CPU s | CPU ratio | wall ratio | load (1 min) |" + (" machine |" if tag else ""),
           "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if tag else "")]

    def machine(*rs) -> str:
        if not tag:
            return ""
        tags = list(dict.fromkeys(tag[r.get("machine", data["machine"]["cpu"])] for r in rs if r))
        return f" {' (streaming) / '.join(tags)}{' (in memory)' if len(tags) > 1 else ''} |" if tag else ""
    for method in sorted({r["method"] for r in rows}, key=lambda m: (m != "wanda", m)):
        for n in sorted({r["layers"] for r in rows if r["method"] == method}):
            s, m = by.get((n, method, "stream")), by.get((n, method, "memory"))
            ref = s or m
            if ref is None:
                continue

            def cell(r, key, fmt="{:,.0f}"):
                return fmt.format(r[key]) if r else "not run"

            ratio = (lambda k: f"{s[k] / m[k]:.2f}x") if s and m else (lambda k: "")
            out.append(f"| {method} | {n} | {ref['model']['parameters'] / 1e9:.2f}B | {cell(s, 'peak_rss_mb')} | "
                       f"{ref['formula']['issue_bound_mb']:,.0f} | {cell(m, 'peak_rss_mb')} | {ratio('peak_rss_mb')} | "
                       f"{cell(s, 'cpu_s', '{:.0f}')} | {cell(m, 'cpu_s', '{:.0f}')} | {ratio('cpu_s')} | "
                       f"{ratio('wall_s')} | {ref['load'][0]:.1f} |" + machine(s, m))
        st = sorted((r for r in rows if r["method"] == method and r["path"] == "stream"), key=lambda r: r["layers"])
        if len(st) > 1:
            peaks = [r["peak_rss_mb"] for r in st]
            out.append(f"| {method}: streaming peak over {st[0]['layers']}-{st[-1]['layers']} blocks | | | "
                       f"max/min {max(peaks) / min(peaks):.3f} | | | | | | | | |" + (" |" if tag else ""))
    llmc = [r for r in rows if r["path"] == "llm-compressor"]
    for r in llmc:
        s = by.get((r["layers"], r["method"], "stream"))
        vs = f", streaming / llm-compressor {s['peak_rss_mb'] / r['peak_rss_mb']:.2f}x" if s else ""
        on = f" (machine {tag[r['machine']]})" if tag and r.get("machine") in tag else ""
        out.append(f"\nllm-compressor {r['method']} on {r['layers']} blocks{on}: peak {r['peak_rss_mb']:,.0f} MiB{vs}.")
    return "\n".join(out)


if __name__ == "__main__":
    main()
