"""Peak memory and time of one-shot pruning as the model grows: streaming vs in memory (vs llm-compressor).

Random Llama checkpoints of one width and 8, 16, 32, 64 blocks (`make_random_llama.py`, written once into
--models), pruned to 50% with Wanda and SparseGPT on 8 x 256 tokens of WikiText-2 valid. Every run is a fresh
`prunetune prune` process (`--stream` or `--no-stream`), the paths alternating, and its whole-process peak is
the kernel's own high-water mark of its resident memory (`ru_maxrss` from wait4: no sampling gaps). The
streaming peak is checked against the formula README's "Large models" gives:

    embedding table + one block's weights in fp32 + the criterion's statistics + calibration activations + 0.5 GiB

    python benchmarks/memory_scaling.py --models /tmp/rl --layers 8 16 32 64 --methods wanda sparsegpt \
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

    from prunetune.pruning.stream import BASELINE_BYTES, open_checkpoint, plan_memory

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
    bound = embed + block_fp32 + acts + BASELINE_BYTES
    return {"embedding_mb": embed / 2**20, "block_fp32_mb": block_fp32 / 2**20, "activations_mb": acts / 2**20,
            "issue_bound_mb": bound / 2**20, "plan_streaming_mb": plan.streaming / 2**20,
            "plan_in_memory_mb": plan.in_memory / 2**20, "weights_mb": ckpt.nbytes / 2**20}


def prune_cmd(model: Path, out: Path, method: str, stream: bool, nsamples: int, seqlen: int) -> list[str]:
    return [sys.executable, "-m", "prunetune.cli", "prune", str(model), "--method", method, "--sparsity", "0.5",
            "--calib", "wikitext2", "--nsamples", str(nsamples), "--seqlen", str(seqlen),
            "--stream" if stream else "--no-stream", "--out", str(out)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, required=True, help="where the random checkpoints are (made if absent)")
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    ap.add_argument("--paths", nargs="+", default=["stream", "memory"])
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--llmc-python", default=None, help="llm-compressor's venv python: adds its run on the "
                    "largest model (see pruning_peers.py for the venv)")
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()

    env = {**os.environ, "PRUNETUNE_PROGRESS": "0", "TRANSFORMERS_VERBOSITY": "error"}
    rows: list[dict] = []
    if a.json.is_file():
        rows = json.loads(a.json.read_text()).get("rows", [])
    done = {(r["layers"], r["method"], r["path"]) for r in rows}
    models = {}
    for n in a.layers:
        d = a.models / f"llama-w1024-{n}"
        if not (d / "random_llama.json").is_file():
            shutil.rmtree(d, ignore_errors=True)
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_random_llama.py"), "--layers", str(n),
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
                r.update(layers=n, method=method, path=path, load=load_average(),
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
    _summary(rows)


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
    r.update(layers=layers, method=method, path="llm-compressor", load=load_average(),
             model=json.loads((model / "random_llama.json").read_text()))
    print(f"{layers:>3} layers {method:<9} llm-compressor peak {r['peak_rss_mb']:8.0f} MiB  wall {r['wall_s']:7.1f} s",
          flush=True)
    return r


def _write(path: Path, rows: list[dict], a) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": {"cpu": cpu_model(), "cores": os.cpu_count()}, "commit": commit(),
                                "calibration": f"{a.nsamples} x {a.seqlen} tokens of wikitext2/valid, seed 0",
                                "rows": rows}, indent=2))


def _summary(rows: list[dict]) -> None:
    by = {(r["layers"], r["method"], r["path"]): r for r in rows}
    for method in sorted({r["method"] for r in rows}):
        st = [by[k] for k in sorted(by) if k[1] == method and k[2] == "stream"]
        if len(st) > 1:
            peaks = [r["peak_rss_mb"] for r in st]
            print(f"{method}: streaming peak {min(peaks):.0f}-{max(peaks):.0f} MiB over {st[0]['layers']}-"
                  f"{st[-1]['layers']} layers ({max(peaks) / min(peaks):.3f}x); bound "
                  + ", ".join(f"{r['peak_rss_mb']:.0f}<={r['formula']['issue_bound_mb']:.0f}" for r in st))
        for r in st:
            m = by.get((r["layers"], method, "memory"))
            if m:
                print(f"  {r['layers']} layers: streaming/in-memory peak {r['peak_rss_mb'] / m['peak_rss_mb']:.2f}x, "
                      f"prune stage {r['prune_stage_s'] / m['prune_stage_s']:.2f}x, wall {r['wall_s'] / m['wall_s']:.2f}x")
            l = by.get((r["layers"], method, "llm-compressor"))
            if l:
                print(f"  {r['layers']} layers: streaming/llm-compressor peak {r['peak_rss_mb'] / l['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
