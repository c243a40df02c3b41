"""Structured pruning that makes SmolLM2 smaller and faster: VIB vs L1 / L2 / Wanda / FLAP, one engine.

Every row prunes a fresh SmolLM2-135M (fp32) to a fraction of *block parameters* removed, shrinks it
physically (uniform widths per layer, neurons and hidden widths rounded to --round-to), saves it as a plain
HF directory, reloads it with stock `AutoModelForCausalLM` and measures:

* parameters, size on disk, perplexity (WikiText-2 test, --ppl-windows windows of 512 tokens);
* the compute ratio: per-token weight FLOPs of dense ÷ pruned (blocks + the tied 49k LM head);
* speed against dense, measured alternately in one run (--reps repetitions each, medians): forward latency
  at batch 1 x 256 and batch 8 x 256 tokens, and greedy generation tokens/s (32 new tokens, KV cache) in
  transformers, at batch 1 and batch 8 (prompts of 16 tokens); speedup ÷ compute ratio; and one profiled
  batch-1 generation of each model, split into matrix-product time (shrinks with the widths) and the rest
  (norms, attention kernels, Python and generate's loop: it does not). Speed depends only on the widths, so
  it is measured once per distinct widths and shared by the rows that have them.

Optional LoRA recovery (--recover vib,flap@0.3 ...) fine-tunes the shrunk export on WikiText-2 valid and
re-measures perplexity (--recover-samples windows of 256, batch 2; a row named METHOD+rN@S uses N instead).
Rows are resumable: results/structured.json is rewritten after every row, and a row already there is skipped.
Run it in the background with `nice`; the CPU is shared.

    PRUNETUNE_DATA_DIR=... nice python benchmarks/structured.py --out benchmarks/results/structured.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path


def machine() -> dict:
    import torch
    from _machine import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "loadavg": os.getloadavg(), "torch": torch.__version__}


def load(spec: str):
    from prunetune.models.loading import load_model

    loaded = load_model(spec, "causal-lm")
    return loaded.model.eval(), loaded.tokenizer


def ppl(model, tok, windows: int) -> dict:
    from prunetune.data.sources import load_wikitext2
    from prunetune.evaluation.perplexity import perplexity

    r = perplexity(model, tok, load_wikitext2("test"), seqlen=512, max_windows=windows, batch_size=4, progress=False)
    return {"ppl": r["value"], "ppl_seconds": r["seconds"], "windows": windows, "seqlen": 512,
            "dataset": "wikitext2/test"}


def speed_pair(dense, pruned, reps: int, gen_tokens: int = 32, b8_reps: int | None = None,
               speed_threads: int = 2) -> dict:
    """Alternating timings (dense, pruned) x reps; medians and ratios (dense time / pruned time)."""
    import torch

    with torch.no_grad():
        return _speed_pair(dense, pruned, reps, gen_tokens, b8_reps, speed_threads)


def _speed_pair(dense, pruned, reps, gen_tokens, b8_reps, speed_threads) -> dict:
    import torch
    from prunetune.evaluation.speed import _dummy_inputs

    def fwd(m, b):
        inp = _dummy_inputs(m, b, 256)
        return lambda: m(**inp)

    def gen(m, batch=1):
        inp = _dummy_inputs(m, batch, 16, seed=1)
        pad = m.config.eos_token_id if isinstance(m.config.eos_token_id, int) else 0
        return lambda: m.generate(**inp, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, do_sample=False,
                                  pad_token_id=pad)

    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(speed_threads)
    for name, make in (("b1x256", lambda m: fwd(m, 1)), ("b8x256", lambda m: fwd(m, 8)), ("generate", gen),
                       ("generate_b8", lambda m: gen(m, 8))):
        n = reps if name not in ("b8x256", "generate_b8") or b8_reps is None else b8_reps
        if n < 1:
            continue
        fns = {"dense": make(dense), "pruned": make(pruned)}
        times: dict[str, list[float]] = {"dense": [], "pruned": []}
        for f in fns.values():  # warm-up
            f()
        for _ in range(n):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[name] = {"dense_s": med["dense"], "pruned_s": med["pruned"], "speedup": med["dense"] / med["pruned"],
                     "dense_all": times["dense"], "pruned_all": times["pruned"], "reps": n}
        if name.startswith("generate"):
            rows = 8 if name == "generate_b8" else 1
            out[name]["dense_tokens_per_s"] = rows * gen_tokens / med["dense"]
            out[name]["pruned_tokens_per_s"] = rows * gen_tokens / med["pruned"]
    if reps >= 1:
        out["generate_profile"] = {k: matmul_split(f) for k, f in (("dense", gen(dense)), ("pruned", gen(pruned)))}
    torch.set_num_threads(threads)
    out["reps"] = reps
    out["threads"] = speed_threads
    out["loadavg"] = os.getloadavg()
    return out


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def matmul_split(fn) -> dict:
    """One profiled call of `fn`: seconds inside matrix products (self CPU time of the ops above, so nothing is
    counted twice) and the rest of the wall time (attention kernels, norms, Python, generate's own loop). Why a
    generation speedup stays below the compute ratio: only the first part shrinks with the widths."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    mm = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMUL_OPS) / 1e6
    return {"matmul_s": mm, "other_s": wall - mm, "wall_s": wall}


def _ppl_row(data: dict, name: str, windows: int, dense, tok, work: Path) -> None:
    """Perplexity of an earlier row's export (and of its LoRA recovery, when there is one) at `windows` windows,
    kept beside the row's first measurement under ppl_at[windows]."""
    from transformers import AutoModelForCausalLM

    r = data["rows"].get(name)
    if r is None:
        print("cannot measure", name, "(row missing)", flush=True)
        return
    key = str(windows)
    if name == "dense":
        r.setdefault("ppl_at", {})[key] = ppl(dense, tok, windows)
    else:
        d = work / name.replace("@", "_")
        if key not in r.get("ppl_at", {}):  # a row recovered later keeps its export's earlier measurement
            if not d.exists():
                print("cannot measure", name, "(its export is gone: re-run the row)", flush=True)
                return
            r.setdefault("ppl_at", {})[key] = ppl(AutoModelForCausalLM.from_pretrained(d).eval(), tok, windows)
        rec = work / f"{d.name}-lora" / "model"
        if "recovered" in r and rec.exists():
            model, _ = load(str(rec))
            r["recovered"].setdefault("ppl_at", {})[key] = ppl(model, tok, windows)
    print(name, windows, "windows:", r["ppl_at"][key]["ppl"],
          r.get("recovered", {}).get("ppl_at", {}).get(key, {}).get("ppl"), flush=True)


def _ppl_missing(data: dict, row: str) -> bool:
    """A pplN:ROW row already run is due again when ROW was LoRA-recovered after it (no recovered value at N)."""
    if not (row.startswith("ppl") and ":" in row):
        return False
    n, _, ref = row[3:].partition(":")
    r = data["rows"].get(ref, {})
    return "recovered" in r and n not in r["recovered"].get("ppl_at", {})


def _ensure_dense_export(dense, tok, d: Path) -> None:
    """The dense model as an HF directory with its tokenizer (the converter reads both), re-saved when the
    directory holds another model (the work dir is shared with other runs of this script)."""
    cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").exists() else {}
    same = all(cfg.get(k) == getattr(dense.config, k) for k in ("hidden_size", "vocab_size", "num_hidden_layers"))
    if not same or not (d / "tokenizer_config.json").exists():
        dense.save_pretrained(d)
        tok.save_pretrained(d)
        for stale in d.parent.glob(f"{d.name}-f32.gguf"):
            stale.unlink()


def _gguf(src: Path, work: Path, converter: Path) -> Path:
    """An f32 GGUF of an HF export, made once with llama.cpp's own converter (no change to the export)."""
    import subprocess
    import sys

    out = work / f"{src.name}-f32.gguf"
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        subprocess.run([sys.executable, str(converter), str(src), "--outfile", str(tmp), "--outtype", "f32"],
                       check=True, capture_output=True)  # the converter's own gguf-py, beside it
        tmp.replace(out)
    return out


def llama_bench_pair(dense_dir: Path, pruned_dir: Path, work: Path, args) -> dict:
    """llama.cpp prompt processing (256 tokens) and generation (32 tokens) in tokens/s, dense and pruned
    alternately: each repetition runs llama-bench once per model (-r 1), so load drift hits both alike."""
    import subprocess

    converter, bench = Path(args.llama_converter), Path(args.llama_bench)
    if not converter.is_file() or not bench.is_file():
        raise SystemExit(f"llama.cpp rows need --llama-converter and --llama-bench (got {converter}, {bench})")
    models = {"dense": _gguf(dense_dir, work, converter), "pruned": _gguf(pruned_dir, work, converter)}
    tps: dict[str, dict[str, list[float]]] = {k: {"pp": [], "tg": []} for k in models}
    for _ in range(args.reps):
        for k, m in models.items():
            r = subprocess.run([str(bench), "-m", str(m), "-t", str(args.speed_threads), "-p", "256", "-n", "32",
                                "-r", "1", "-o", "json"], check=True, capture_output=True, text=True)
            for test in json.loads(r.stdout):
                kind = "pp" if test["n_prompt"] > 0 else "tg"
                tps[k][kind].append(test["avg_ts"])
    out: dict = {}
    for kind in ("pp", "tg"):
        med = {k: statistics.median(v[kind]) for k, v in tps.items()}
        out[kind] = {"dense_tokens_per_s": med["dense"], "pruned_tokens_per_s": med["pruned"],
                     "speedup": med["pruned"] / med["dense"], "dense_all": tps["dense"][kind],
                     "pruned_all": tps["pruned"][kind]}
    out.update({"reps": args.reps, "threads": args.speed_threads, "type": "f32", "prompt": 256, "generate": 32,
                "loadavg": os.getloadavg()})
    return out


def _share_timings(data: dict) -> None:
    """Speed depends on the widths (and bias flag) only: every row gets the ratios of the timings measured for
    its `speed_key`, in transformers and in llama.cpp."""
    for r in data["rows"].values():
        key = r.get("speed_key")
        if key in data.get("speed", {}):
            sp = data["speed"][key]
            r["speed"] = {k: sp[k]["speedup"] for k in ("b1x256", "b8x256", "generate", "generate_b8") if k in sp}
            r["gen_speedup_over_ratio"] = sp["generate"]["speedup"] / r["compute_ratio"]
        if key in data.get("llama_cpp", {}):
            r["llama_cpp"] = {k: data["llama_cpp"][key][k]["speedup"] for k in ("pp", "tg")}


def timing_table(data: dict) -> str:
    """Generation per distinct widths: batch 1 and batch 8 against the compute ratio, and the profiled split of
    a batch-1 generation into matrix products (which shrink with the widths) and the rest (which does not)."""
    out = ["| widths kv/neurons/hidden, biases | rows | compute ratio | generate b1 | b1 ÷ ratio | "
           "matmul s dense / pruned (speedup) | other s dense / pruned | generate b8 | b8 ÷ ratio | load (1 min) |",
           "|" + "---|" * 10]
    for key, sp in data.get("speed", {}).items():
        rows = [n for n, r in data["rows"].items() if r.get("speed_key") == key and "widths" in r]
        if not rows:
            continue
        ratio, w = data["rows"][rows[0]]["compute_ratio"], data["rows"][rows[0]]["widths"]
        g1, g8, prof = sp.get("generate"), sp.get("generate_b8"), sp.get("generate_profile")
        load = f"{sp['loadavg'][0]:.1f}" if sp.get("loadavg") else "n/r"
        if prof:
            d, q = prof["dense"], prof["pruned"]
            mm = f"{d['matmul_s']:.2f} / {q['matmul_s']:.2f} ({d['matmul_s'] / q['matmul_s']:.2f}x)"
            other = f"{d['other_s']:.2f} / {q['other_s']:.2f}"
        else:
            mm = other = "n/m"
        out.append(f"| {w['kv']}/{w['neurons']}/{w['hidden']}, {key.split('bias=')[1]} | {', '.join(rows)} | "
                   f"{ratio:.2f} | {_cell(g1 and g1['speedup'])} | {_cell(g1 and g1['speedup'] / ratio, '{:.2f}')} | "
                   f"{mm} | {other} | {_cell(g8 and g8['speedup'])} | "
                   f"{_cell(g8 and g8['speedup'] / ratio, '{:.2f}')} | {load} |")
    return "\n".join(out)


def save(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def _cell(x, fmt: str = "{:.2f}x") -> str:
    return "n/m" if x is None else fmt.format(x)


def _ppl_cell(r: dict, windows: str, dense: dict | None) -> str:
    """`ppl` at `windows` ("first" = the row's own measurement), with its ratio to dense at the same windows."""
    m = r if windows == "first" else r.get("ppl_at", {}).get(windows)
    if not m:
        return "n/m"
    d = None if not dense else (dense if windows == "first" else dense.get("ppl_at", {}).get(windows))
    return f"{m['ppl']:.2f}" + (f" ({m['ppl'] / d['ppl']:.2f}x)" if d and r is not dense else "")


def _budget_scale(c: dict) -> str:
    """' x f' where the row's gate lrs were scaled down for its budget (StructuredSpec.vib_lr_steps)."""
    ref, steps = c.get("lr_steps"), c.get("steps")
    return f" x {ref / steps:g}" if ref and steps and steps > ref else ""


def table(data: dict) -> str:
    """Markdown tables of the rows (for BENCHMARKS.md): the main table, then what each VIB row trained."""
    rows = data["rows"]
    dense = rows.get("dense", {})
    own = {r.get("windows") for n, r in rows.items() if n != "dense" and "widths" in r}  # each row's --ppl-windows
    n_own = own.pop() if len(own) == 1 else None
    own_label = f"ppl, {n_own} windows" if n_own not in (None, 64) else "ppl, the row's windows"
    out = ["| row | widths kv/neurons/hidden | block params removed | params (M) | disk (MB) | compute ratio | "
           f"b1x256 | b8x256 | generate | gen ÷ ratio | llama.cpp pp256 / tg32 | {own_label} | ppl, 64 windows | "
           "after LoRA, 8 windows | after LoRA, 64 windows |", "|" + "---|" * 15]
    dw = next((r["dense_widths"] for r in rows.values() if "dense_widths" in r), None)
    if dense:
        dws = f"{dw['kv']}/{dw['neurons']}/{dw['hidden']}" if dw else "-"
        out.append(f"| dense | {dws} | 0 | {dense['params'] / 1e6:.1f} | {dense['disk_bytes'] / 2**20:.0f} | 1.00 | "
                   f"1.00 | 1.00 | 1.00 | 1.00 | 1.00 / 1.00 | {_ppl_cell(dense, 'first', None)} | "
                   f"{_ppl_cell(dense, '64', None)} | | |")
    vib = []
    for name, r in rows.items():
        if name == "dense" or "widths" not in r:
            continue
        w, sp, lc = r["widths"], r.get("speed", {}), r.get("llama_cpp")
        rec = r.get("recovered", {})
        lcs = f"{lc['pp']:.2f}x / {lc['tg']:.2f}x" if lc else "n/m"
        out.append(f"| {name} | {w['kv']}/{w['neurons']}/{w['hidden']} | {r['block_sparsity']:.3f} | "
                   f"{r['params'] / 1e6:.1f} | {r['disk_bytes'] / 2**20:.0f} | {r['compute_ratio']:.2f} | "
                   f"{_cell(sp.get('b1x256'))} | {_cell(sp.get('b8x256'))} | {_cell(sp.get('generate'))} | "
                   f"{_cell(r.get('gen_speedup_over_ratio'), '{:.2f}')} | {lcs} | {_ppl_cell(r, 'first', dense)} | "
                   f"{_ppl_cell(r, '64', dense)} | {_ppl_cell(rec, 'first', dense) if rec else ''} | "
                   f"{_ppl_cell(rec, '64', dense) if rec else ''} |")
        if "vib" in r:
            v = r["vib"]
            c, last = v.get("config", {}), v.get("last", {})
            trained = last.get("seconds")
            if v.get("reused_gates"):  # the gates of another row: name it (its time is in its own line)
                twin = next((n for n, o in rows.items() if o.get("vib", {}).get("gate_file") == v.get("gate_file")
                             and not o["vib"].get("reused_gates")), None)
                trained = f"reused ({twin})" if twin else "reused"
            mu = v.get("mu", {})
            mus = ", ".join(f"{k} {m['min']:.2f}-{m['max']:.2f}" for k, m in mu.items()) or "n/r"
            vib.append(f"| {name} | {v.get('budget', '')} | {c.get('loss', 'lm')} | {'yes' if c.get('center') else 'no'} | "
                       f"{c.get('optimizer', 'adam')} | {c.get('constraint', 'global')} | "
                       f"{'FLAP' if c.get('neuron_ranking') == 'flap' else 'gates'} | "
                       f"{c.get('vib_lr')} / {c.get('mu_lr') if c.get('mu_lr') is not None else c.get('vib_lr')}"
                       f"{_budget_scale(c)} | {c.get('lagrangian_lr')}"
                       f"{'' if c.get('lagrangian_step', 'adam') == 'adam' else ' (' + c['lagrangian_step'] + ')'} | "
                       f"{c.get('init_log_sigma2')} | "
                       f"{v.get('thresholded_sparsity', float('nan')):.3f} | {mus} | "
                       f"{trained if isinstance(trained, str) else _cell(trained, '{:.0f}')} |")
    if vib:
        out += ["", "| VIB row | gate budget | objective | centred | gate optimizer | constraint | neurons ranked by | "
                "lr log σ² / μ | multiplier lr | init log σ² | removed after thresholding | μ range | gate training (s) |",
                "|" + "---|" * 13, *vib]
    if any("generate_b8" in sp or "generate_profile" in sp for sp in data.get("speed", {}).values()):
        out += ["", timing_table(data)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default="dense,flap@0.3,vib@0.3,wanda@0.3,l2@0.3,l1@0.3,flap@flops0.5,flap@0.5,"
                    "flap@0.2,vib@0.5,wanda@0.5,l2@0.5,l1@0.5,vib@0.2,wanda@0.2,l2@0.2,l1@0.2,vib@flops0.5",
                    help="method@sparsity of block parameters; method@flops0.5 = 50%% of per-token FLOPs (needs hidden)")
    ap.add_argument("--structures", default="heads,neurons")
    ap.add_argument("--round-to", type=int, default=64)
    ap.add_argument("--calib", type=int, default=8, help="calibration windows of 256 tokens (WikiText-2 valid)")
    ap.add_argument("--vib-steps", type=int, default=16)
    ap.add_argument("--vib-batch", type=int, default=1)
    ap.add_argument("--vib-lr", type=float, default=0.5)
    ap.add_argument("--vib-init", type=float, default=-4.0, help="initial log sigma^2 of the gates")
    ap.add_argument("--vib-mu-lr", type=float, default=None, help="learning rate of the gates' mu (default --vib-lr)")
    ap.add_argument("--vib-lag-lr", type=float, default=0.5, help="learning rate of the Lagrange multipliers")
    ap.add_argument("--vib-lag-step", default="adam", choices=["adam", "gap"],
                    help="how the multipliers move (StructuredSpec.lagrangian_step)")
    ap.add_argument("--vib-warmup", type=float, default=0.5, help="LAGRANGIAN_WARMUP (fraction of the steps)")
    ap.add_argument("--vib-beta", type=float, default=1.0, help="sharpness of the soft keep-probability")
    ap.add_argument("--vib-loss", default="lm", choices=("lm", "kd"), help="gate objective: LM loss or KL to dense")
    ap.add_argument("--vib-antithetic", action="store_true", help="pair every window with the negated gate noise")
    ap.add_argument("--vib-seqlen", type=int, default=256, help="tokens per gate-training window")
    ap.add_argument("--vib-widths", default="learned", choices=("learned", "uniform"),
                    help="VIB widths: learned KV count from thresholding, or the baselines' uniform rule")
    ap.add_argument("--vib-optimizer", default="adam", choices=("adam", "nsgd"), help="gate optimizer (VibMethod's optimizer)")
    ap.add_argument("--vib-constraint", default="global", choices=("global", "per_layer"),
                    help="Lagrangian on the global kept fraction, or on every layer's count (VibMethod's constraint)")
    ap.add_argument("--vib-lr-steps", type=int, default=None,
                    help="StructuredSpec.vib_lr_steps: the step count the lrs are set for (longer runs scale them "
                         "down); default None = constant lr, as every row before it")
    ap.add_argument("--vib-lr-decay", type=float, default=1.0, help="gate lr factor reached at the last step")
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True,
                    help="time every row as it is made (else only speed:ROW rows time, once per distinct widths)")
    ap.add_argument("--b8-reps", type=int, default=None, help="repetitions of the 8 x 256 latency (default --reps; 0 = skip)")
    ap.add_argument("--force-speed", action="store_true", help="speed:/llama: rows re-time widths already timed "
                    "(the new timing replaces the old one)")
    ap.add_argument("--speed-threads", type=int, default=2, help="torch threads while timing (the rest runs on 1)")
    ap.add_argument("--recover", default="", help="rows to LoRA-recover, e.g. vib@0.3,flap@0.3")
    ap.add_argument("--recover-samples", type=int, default=32, help="LoRA steps = samples / batch 2, 256 tokens")
    ap.add_argument("--llama-bench", default="", help="llama.cpp's llama-bench binary (llama:ROW rows)")
    ap.add_argument("--llama-converter", default="", help="llama.cpp's convert_hf_to_gguf.py (llama:ROW rows)")
    ap.add_argument("--out", default="benchmarks/results/structured.json")
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return

    from safetensors.torch import load_file, save_file

    from prunetune.methods.shrink import prune_structured
    from prunetune.methods.vib import StructuredSpec
    from prunetune.pruning.shrink.scores import calibration_windows
    from prunetune.pruning.shrink.widths import allocate_widths, geometry

    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {"rows": {}, "speed": {}}
    data["machine"] = machine()
    data["settings"] = vars(args)  # the latest invocation's; every invocation is kept below (rows resume)
    data.setdefault("invocations", []).append({**vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                                               "loadavg": os.getloadavg()})
    dense, tok = load(args.model)
    geom = geometry(dense)
    budgets = [m.group(1) for r in args.rows.split(",") if (m := re.match(r"^vib[\w+]*:(\d+)@", r))]  # vib+center:256@0.5
    longest = max([args.vib_steps] + [int(b) for b in budgets])
    calib = calibration_windows(tok, "wikitext2", args.calib, 256, seed=0)
    vib_calib = calibration_windows(tok, "wikitext2", longest * args.vib_batch, args.vib_seqlen, seed=0)
    work = Path(os.environ.get("STRUCTURED_BENCH_WORK", Path(tempfile.gettempdir()) / "prunetune-structured-bench"))
    work.mkdir(parents=True, exist_ok=True)
    todo = [r for r in args.rows.split(",") if r]
    recover = {r for r in args.recover.split(",") if r}

    def flops_sparsity() -> float:
        """Block sparsity whose uniform allocation (with hidden) removes 50% of per-token FLOPs."""
        structs = tuple(dict.fromkeys(args.structures.split(",") + ["hidden"]))
        full = geom.flops_per_token(geom.dense())
        best = min((abs(1 - geom.flops_per_token(allocate_widths(geom, s / 100, structs, args.round_to)) / full - 0.5), s / 100)
                   for s in range(30, 80))
        return best[1]

    for row in todo:
        timing = row.startswith(("speed:", "llama:")) and args.force_speed
        if row in data["rows"] and (row not in recover or "recovered" in data["rows"][row]) and not timing \
                and not _ppl_missing(data, row):
            print("skip", row, flush=True)
            continue
        t0 = time.perf_counter()
        if row.startswith("speed:"):  # speed:ROW = time ROW's export against dense (once per distinct widths)
            ref = data["rows"].get(row[6:])
            src = work / row[6:].replace("@", "_")
            if ref is None or not src.exists():
                print("cannot time", row, "(row missing or its export is gone)", flush=True)
                continue
            if ref["speed_key"] not in data["speed"] or args.force_speed:
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(src).eval()
                data["speed"][ref["speed_key"]] = speed_pair(dense, model, args.reps, b8_reps=args.b8_reps,
                                                              speed_threads=args.speed_threads)
                del model
            _share_timings(data)
            data["rows"][row] = {"done": True, "seconds": time.perf_counter() - t0}
            save(path, data)
            timed = data["speed"][ref["speed_key"]]
            print(row, {k: v["speedup"] for k, v in timed.items() if isinstance(v, dict) and "speedup" in v},
                  flush=True)
            continue
        if row.startswith("ppl") and ":" in row:  # pplN:ROW = ROW's export (and its LoRA recovery) at N windows
            n, _, ref_row = row[3:].partition(":")
            _ppl_row(data, ref_row, int(n), dense, tok, work)
            data["rows"][row] = {"done": True, "seconds": time.perf_counter() - t0}
            save(path, data)
            continue
        if row.startswith("llama:"):  # llama:ROW = llama.cpp's llama-bench, ROW's export against dense
            ref = data["rows"].get(row[6:])
            src = work / row[6:].replace("@", "_")
            if ref is None or not src.exists():
                print("cannot time", row, "(row missing or its export is gone)", flush=True)
                continue
            key = ref["speed_key"]
            _ensure_dense_export(dense, tok, work / "dense")
            if key not in data.setdefault("llama_cpp", {}) or args.force_speed:
                data["llama_cpp"][key] = llama_bench_pair(work / "dense", src, work, args)
            _share_timings(data)
            data["rows"][row] = {"done": True, "seconds": time.perf_counter() - t0}
            save(path, data)
            print(row, data["rows"][row[6:]]["llama_cpp"], flush=True)
            continue
        if row == "dense":
            res = {"params": sum(p.numel() for p in dense.parameters()), **ppl(dense, tok, args.ppl_windows)}
            d = work / "dense"
            dense.save_pretrained(d)
            tok.save_pretrained(d)
            res["disk_bytes"] = sum(f.stat().st_size for f in d.glob("*.safetensors"))
            res["flops_per_token"] = geom.flops_per_token(geom.dense())
            data["rows"][row] = res
            save(path, data)
            continue
        method, _, target = row.partition("@")
        method, _, steps = method.partition(":")  # vib:64@0.3 = VIB with a 64-step gate budget
        budget = re.search(r"\+r(\d+)$", method)  # flap+r64@0.3 = flap@0.3 recovered on 64 samples (--recover)
        samples = int(budget.group(1)) if budget else args.recover_samples
        method = method[: budget.start()] if budget else method
        hybrid = method.endswith("+flapneurons")  # vib+center+flapneurons@0.5: KV groups from the gates, neurons
        method = method.removesuffix("+flapneurons")  # by FLAP (StructuredSpec.vib_neuron_ranking; the same gates)
        split = "measured" if method.endswith("+measured") else "equal"  # flap+measured@0.3: StructuredSpec.split
        method = method.removesuffix("+measured")
        learned = method.endswith("+learned")  # vib+center+learned@0.3: the gates' KV count (vib_widths learned)
        method = method.removesuffix("+learned")
        neurons_only = method.endswith("+neurons")  # flap+neurons@0.3: the whole budget from MLP neurons
        method = method.removesuffix("+neurons")
        comp = method.endswith("+comp")  # vib+comp@0.3 = the same gates as vib@0.3, plus FLAP's bias compensation
        center = method.endswith("+center")  # vib+center@0.3 = gates on the deviation from the mean (StructuredSpec.vib_center)
        method = method.removesuffix("+comp").removesuffix("+center")
        vib_steps = int(steps) if steps else args.vib_steps
        structs = "neurons" if neurons_only else args.structures
        if target.startswith("flops"):
            structs = ",".join(dict.fromkeys(args.structures.split(",") + ["hidden"]))
            sparsity = flops_sparsity()
        else:
            sparsity = float(target)
        res = data["rows"].get(row)
        d = work / row.replace("@", "_")
        if res is None:
            model, _ = load(args.model)
            vib = StructuredSpec(vib_steps=vib_steps, vib_batch=args.vib_batch, vib_lr=args.vib_lr,
                                 vib_mu_lr=args.vib_mu_lr, init_log_sigma2=args.vib_init,
                                 lagrangian_warmup=args.vib_warmup, lagrangian_lr=args.vib_lag_lr, vib_loss=args.vib_loss,
                                 vib_widths="learned" if learned else args.vib_widths, vib_center=center,
                                 vib_neuron_ranking="flap" if hybrid else "vib", split=split,  # explicit: rows keep their meaning
                                 lagrangian_step=args.vib_lag_step, vib_lr_steps=args.vib_lr_steps)
            vib_options = {"beta": args.vib_beta, "antithetic": args.vib_antithetic, "lr_decay": args.vib_lr_decay,
                           "compensate": comp, "optimizer": args.vib_optimizer, "constraint": args.vib_constraint}
            gate_file = work / (f"gates_{structs.replace(',', '-')}_{sparsity}_{vib_steps}"
                                + ("_center" if center else "")
                                + ("" if args.vib_constraint == "global" else f"_{args.vib_constraint}")
                                + ("" if args.vib_lag_step == "adam" else f"_{args.vib_lag_step}{args.vib_lag_lr:g}")
                                + ("" if args.vib_lr_steps is None else f"_lrsteps{args.vib_lr_steps}")
                                + ".safetensors")
            gate_state = load_file(gate_file) if method == "vib" and gate_file.exists() else None
            gates_out: dict = {}
            t_p = time.perf_counter()
            model, facts = prune_structured(model, method, sparsity, structures=structs, round_to=args.round_to,
                                            ids=calib[: args.calib] if method != "vib" else vib_calib, vib=vib,
                                            vib_options=vib_options,
                                            gate_state=gate_state, gates_out=gates_out)
            facts["prune_seconds"] = time.perf_counter() - t_p
            if method == "vib" and gate_state is None:
                save_file(gates_out, gate_file)
            elif method == "vib":  # the gates of an earlier row: its training facts, not this row's (none)
                twin = next((r for r in data["rows"].values() if r.get("vib", {}).get("gate_file") == gate_file.name), {})
                facts["vib"] = {**twin.get("vib", {}), **{k: v for k, v in facts["vib"].items() if k != "steps_done"},
                                "reused_gates": True}
            if method == "vib":
                facts["vib"]["gate_file"] = gate_file.name
                per = args.vib_batch * args.vib_seqlen
                facts["vib"]["budget"] = (f"{vib_steps} steps x {args.vib_batch} x {args.vib_seqlen} tokens = "
                                          f"{vib_steps * per} tokens" + (" (each twice, antithetic noise)"
                                                                          if args.vib_antithetic else ""))
            model.save_pretrained(d)
            tok.save_pretrained(d)
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(d).eval()  # stock transformers loads it
            res = {**facts, "params": sum(p.numel() for p in model.parameters()),
                   "disk_bytes": sum(f.stat().st_size for f in d.glob("*.safetensors")),
                   "flops_per_token": geom.flops_per_token(geom.dense()) / facts["compute_ratio"],
                   **ppl(model, tok, args.ppl_windows)}
            key = json.dumps(res["widths"], sort_keys=True) + f" bias={bool(model.config.mlp_bias)}"
            res["speed_key"] = key
            if args.speed and key not in data["speed"]:
                data["speed"][key] = speed_pair(dense, model, args.reps, b8_reps=args.b8_reps,
                                                              speed_threads=args.speed_threads)
            res["seconds"] = time.perf_counter() - t0
            data["rows"][row] = res
            _share_timings(data)
            save(path, data)
            print(row, {k: res[k] for k in ("widths", "block_sparsity", "compute_ratio", "ppl")},
                  res.get("speed"), flush=True)
            del model
        if row in recover and "recovered" not in res:
            if not d.exists():
                print("cannot recover", row, "(its export is gone: re-run the row)", flush=True)
                continue
            from prunetune.data.spec import DataSpec
            from prunetune.tuning.finetune import finetune
            from prunetune.tuning.spec import TuneSpec

            t_r = time.perf_counter()
            cfg = TuneSpec(kd=False, steps=None, epochs=1, n_samples=samples, batch_size=2, seqlen=256, eval_samples=2,
                           test_samples=2, retention=False, lora_rank=8, lora_alpha=16, lora_dropout=0.0, lr=1e-3)
            fin = finetune(str(d), cfg, work / f"{d.name}-lora", task="causal-lm", data=DataSpec(train="wikitext2"),
                           overwrite=True)
            model, _ = load(str(work / f"{d.name}-lora" / "model"))
            res["recovered"] = {**ppl(model, tok, args.ppl_windows), "lora": {
                "rank": 8, "samples": samples, "batch": 2, "seqlen": 256, "lr": 1e-3,
                "data": "wikitext2/valid"}, "seconds": time.perf_counter() - t_r,
                "train_loss": fin.get("train_loss")}
            data["rows"][row] = res
            save(path, data)
            print(row, "recovered ppl", res["recovered"]["ppl"], flush=True)
    data["machine"]["loadavg_end"] = os.getloadavg()
    save(path, data)


if __name__ == "__main__":
    main()
