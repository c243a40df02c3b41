"""Pruning engine speed and memory against two baselines, measured alternately in one run (issue 17).

Three implementations prune SmolLM2-135M (fp32) with the same 32 × 512 WikiText-2 valid calibration windows
(seed 0; the token ids are written once to `runs/calib_ids.safetensors` and every side reads exactly these):
prunetune's `prune()`, the minimal implementation written from the papers (`benchmarks/_pruning_baseline.py`,
committed before this benchmark and unchanged since; it draws the same windows itself, which this script
checks) and llm-compressor's `oneshot` with `WandaPruningModifier` / `SparseGPTModifier` (its sequential
pipeline, lm_head ignored as in prunetune). prunetune and llm-compressor load one plain fp32 HF directory
(`runs/smollm2-hf`, the dequantised packaged GGUF); the minimal baseline loads the same weights through
prunetune's alias. Every repetition is a fresh child process; the order of the implementations rotates from
one repetition to the next, so a load spike on the shared machine hits each side alike. Per run: wall and
CPU seconds of the pruning call alone (model already loaded), the peak RSS sampled every 20 ms during it
(whole process), and for prunetune and llm-compressor also the RSS before the model was loaded, so the
peak above the interpreter and libraries is known. Perplexity (WikiText-2 test, first 64 non-overlapping
windows of 512, prunetune's evaluator) is measured once per implementation and method, from the first
repetition's result (llm-compressor's pruned linears are saved and scored in a prunetune process).
Threads: `--threads` (default 1) for every child. prunetune runs as a library call with its defaults
(`prune(model, method, 0.5, calib=ids)`: calibration batch 1, glibc's malloc settings left alone; the minimal
baseline forwards 4 windows at a time, llm-compressor 1).

`--impls prunetune-stream` adds prunetune's streaming path (`prunetune.prune(path, out=...)`, what `prune
--stream` runs): the call reads the checkpoint block by block and writes the pruned one, so its time includes
that I/O, which the in-memory rows do not (their model is loaded before the clock starts).

`--default-threads` measures what a user of each tool gets: no thread variables are set, so every child runs
at torch's default (one thread per core), and prunetune runs as the `prunetune prune` command does (its
process-wide malloc setting, `calibrate.bound_heap_growth`, and the command's calibration batch, 4). Each row
also has the user and system CPU seconds and the page faults of the pruning call (getrusage), where the
time of an allocation pattern shows (issue 26: system time).

llm-compressor lives in its own virtual environment (it pins its own transformers); create it once:

    python3.11 -m venv .venv-llmc && .venv-llmc/bin/pip install torch==2.13.0 \\
        && .venv-llmc/bin/pip install llmcompressor==0.14.0.1

    PYTHONPATH=src PRUNETUNE_DATA_DIR=../shared/data/wikitext-2 nice -n 5 python benchmarks/pruning_peers.py \\
        --methods wanda sparsegpt --reps 5 --baseline-reps 3 --json benchmarks/results/pruning_peers.json
    # at the machine's default threads, prunetune as its command runs, against llm-compressor
    PYTHONPATH=src PRUNETUNE_DATA_DIR=../shared/data/wikitext-2 python benchmarks/pruning_peers.py \\
        --default-threads --impls prunetune prunetune-stream llm-compressor --methods wanda --reps 5 --no-ppl \\
        --json benchmarks/results/pruning_peers_default_threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

METHODS = {"wanda": {"method": "wanda", "sparsity": 0.5}, "sparsegpt": {"method": "sparsegpt", "sparsity": 0.5},
           "wanda 2:4": {"method": "wanda", "pattern": "2:4"}, "sparsegpt 2:4": {"method": "sparsegpt", "pattern": "2:4"}}
IMPLS = ("prunetune", "prunetune-stream", "baseline", "llm-compressor")


def prepare(model_dir: Path, calib: Path, nsamples: int, seqlen: int) -> None:
    """The shared fp32 HF directory and calibration ids (once); checks the baseline draws the same ids."""
    from safetensors.torch import load_file, save_file

    from prunetune.data.calibration import calibration_samples
    from prunetune.data.sources import load_text
    from prunetune.models.loading import load_model, weights_path

    if not (model_dir / "config.json").is_file():
        shutil.copytree(weights_path("smollm2-135m"), model_dir, dirs_exist_ok=True)
    tok = load_model(str(model_dir), "causal-lm").tokenizer
    text = load_text("wikitext2", "valid").text
    ids = calibration_samples(tok, text, nsamples, seqlen, 0, "wikitext2/valid")
    if calib.is_file():
        if not bool((load_file(str(calib))["input_ids"] == ids).all()):
            raise SystemExit(f"{calib} holds other token ids than WikiText-2 valid seed 0; delete it")
    else:
        calib.parent.mkdir(parents=True, exist_ok=True)
        save_file({"input_ids": ids.contiguous()}, str(calib))
    # the minimal baseline draws its windows itself: the same call (seed 0) on the alias's tokenizer
    base_tok = load_model("smollm2-135m", "causal-lm").tokenizer
    if not torch_equal(calibration_samples(base_tok, text, nsamples, seqlen, 0), ids):
        raise SystemExit("the minimal baseline would calibrate on other windows than the shared file")


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


# ------------------------------------------------------------------------------------------------ prunetune child
def cpu_usage() -> dict:
    """This process's user and system CPU seconds and page faults so far (all its threads)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"user": ru.ru_utime, "sys": ru.ru_stime, "minflt": ru.ru_minflt, "majflt": ru.ru_majflt}


def usage_delta(before: dict, after: dict) -> dict:
    return {"prune_user_seconds": after["user"] - before["user"], "prune_sys_seconds": after["sys"] - before["sys"],
            "prune_minor_faults": after["minflt"] - before["minflt"],
            "prune_major_faults": after["majflt"] - before["majflt"]}


def prunetune_child(args: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import load_file

    from _machine import PeakRSS, rss
    from prunetune.data.sources import load_text
    from prunetune.evaluation.perplexity import perplexity
    from prunetune.models.loading import load_model
    from prunetune.pruning.api import prune
    from prunetune.pruning.masks import sparsity_report

    cfg = METHODS[args.method]
    batch = 1
    if args.as_cli:  # what `prunetune prune` does before its stages run, and its calibration batch
        from prunetune.config import PruneSpec
        from prunetune.pruning.calibrate import bound_heap_growth

        bound_heap_growth(memory_first=args.stream)  # the command's setting for the path it runs
        batch = PruneSpec.model_fields["calib_batch"].default
    if args.stream:
        return stream_child(args, cfg, batch)
    rss_before_model = rss()
    loaded = load_model(str(args.model), "causal-lm")
    model, tok = loaded.model, loaded.tokenizer
    ids = load_file(str(args.calib))["input_ids"]
    if args.weights:  # score another implementation's result: load its pruned linears, no pruning here
        state = load_file(args.weights)
        missing = set(state) - set(dict(model.named_parameters()))
        if missing:
            raise SystemExit(f"weights not in the model: {sorted(missing)[:3]}")
        with torch.no_grad():
            params = dict(model.named_parameters())
            for k, v in state.items():
                params[k].copy_(v)
        row: dict = {}
    else:
        rss_before_prune = rss()
        with PeakRSS() as peak:
            u0 = cpu_usage()
            t0, c0 = time.perf_counter(), time.process_time()
            masks = prune(model, calib=ids, progress=False, batch_size=batch, **cfg)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            usage = usage_delta(u0, cpu_usage())
        row = {"impl": "prunetune", "prune_seconds": seconds, "prune_cpu_seconds": cpu, "peak_rss_bytes": peak.peak,
               "rss_before_model_bytes": rss_before_model, "rss_before_prune_bytes": rss_before_prune,
               "masks": len(masks), "mask_sparsity": masks.sparsity(), "threads": torch.get_num_threads(),
               "calib_batch": batch, "as_cli": bool(args.as_cli), **usage}
    row["real_sparsity"] = sparsity_report(model)["sparsity"]
    if args.ppl:
        r = perplexity(model, tok, load_text("wikitext2", "test"), seqlen=512, max_windows=64, batch_size=4,
                       progress=False)
        row["ppl"], row["ppl_protocol"] = r["value"], r["protocol"]
    return row


def stream_child(args: argparse.Namespace, cfg: dict, batch: int) -> dict:
    """The streaming path (`prunetune.prune(path, out=...)`, what `prune --stream` runs): the checkpoint is
    read block by block from disk and written to a new directory, so the call includes the model's I/O."""
    import tempfile

    import torch
    from safetensors.torch import load_file

    from _machine import PeakRSS, rss
    from prunetune.pruning.stream import prune as prune_path

    ids = load_file(str(args.calib))["input_ids"]
    rss_before = rss()
    with tempfile.TemporaryDirectory() as tmp, PeakRSS() as peak:
        u0 = cpu_usage()
        t0, c0 = time.perf_counter(), time.process_time()
        summary = prune_path(args.model, out=Path(tmp) / "out", calib=ids, progress=False, batch_size=batch, **cfg)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        usage = usage_delta(u0, cpu_usage())
    return {"impl": "prunetune-stream", "prune_seconds": seconds, "prune_cpu_seconds": cpu,
            "peak_rss_bytes": peak.peak, "rss_before_model_bytes": rss_before, "rss_before_prune_bytes": rss_before,
            "masks": len(summary["layers"]), "threads": torch.get_num_threads(), "calib_batch": batch,
            "as_cli": bool(args.as_cli), "real_sparsity": summary["sparsity"], **usage}


# ------------------------------------------------------------------------------------------------------- parent
def run_child(cmd: list[str], env: dict) -> tuple[dict, dict]:
    """Run one child to completion; its own rusage (CPU seconds, max RSS over its whole life) from wait4."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:  # llm-compressor logs every layer: kept out of the table
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            log.seek(0)
            sys.stderr.write(log.read()[-4000:])
            raise SystemExit(f"child failed ({proc.returncode}): {' '.join(cmd)}")
    return {"child_wall_seconds": time.perf_counter() - t0, "child_cpu_seconds": ru.ru_utime + ru.ru_stime,
            "child_maxrss_bytes": ru.ru_maxrss * 1024}, {}


def one_run(impl: str, method: str, args: argparse.Namespace, env: dict, ppl: bool, tmp: Path) -> dict:
    cfg = METHODS[method]
    out = tmp / f"{impl}-{method.replace(' ', '_').replace(':', 'of')}.json"
    out.unlink(missing_ok=True)
    if impl in ("prunetune", "prunetune-stream"):
        cmd = [sys.executable, __file__, "--_child", method, "--_out", str(out), "--model", str(args.model),
               "--calib", str(args.calib)] + (["--_ppl"] if ppl and impl == "prunetune" else [])
        cmd += (["--_cli"] if args.default_threads else []) + (["--_stream"] if impl == "prunetune-stream" else [])
    elif impl == "baseline":
        cmd = [sys.executable, str(ROOT / "benchmarks" / "_pruning_baseline.py"), "--method", cfg["method"],
               "--sparsity", str(cfg["sparsity"]), "--windows", "64" if ppl else "0", "--json", str(out)]
    else:
        cmd = [args.llmc_python, str(ROOT / "benchmarks" / "_pruning_llmc.py"), "--model", str(args.model),
               "--calib", str(args.calib), "--method", cfg["method"], "--json", str(out)]
        cmd += ["--pattern", cfg["pattern"]] if "pattern" in cfg else ["--sparsity", str(cfg["sparsity"])]
        weights = tmp / f"llmc-{method.replace(' ', '_').replace(':', 'of')}.safetensors"
        cmd += ["--save-weights", str(weights)] if ppl else []
    usage, _ = run_child(cmd, env)
    row = json.loads(out.read_text())
    row.update(usage, impl=impl, method=method, load_average=list(os.getloadavg()), finished=time.time())
    if impl == "llm-compressor" and ppl:  # scored by prunetune's evaluator in a prunetune process
        ev = tmp / "llmc-eval.json"
        run_child([sys.executable, __file__, "--_child", method, "--_out", str(ev), "--model", str(args.model),
                   "--calib", str(args.calib), "--_ppl", "--_weights", str(weights)], env)
        scored = json.loads(ev.read_text())
        row["ppl"], row["ppl_protocol"], row["eval_real_sparsity"] = (scored["ppl"], scored["ppl_protocol"],
                                                                      scored["real_sparsity"])
        weights.unlink()
    return row


def summarise(runs: list[dict], methods: list[str]) -> dict:
    def spread(xs: list[float]) -> dict:
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}

    out: dict = {}
    for m in methods:
        per: dict = {}
        for impl in IMPLS:
            rs = [r for r in runs if r["method"] == m and r["impl"] == impl]
            if not rs:
                continue
            per[impl] = {"wall": spread([r["prune_seconds"] for r in rs]),
                         "cpu": spread([r["prune_cpu_seconds"] for r in rs]),
                         **({"sys": spread([r["prune_sys_seconds"] for r in rs]),
                             "minor_faults": spread([r["prune_minor_faults"] for r in rs])}
                            if all("prune_sys_seconds" in r for r in rs) else {}),
                         "peak_rss_mib": spread([r["peak_rss_bytes"] / 2**20 for r in rs]),
                         **({"child_maxrss_mib": spread([r["child_maxrss_bytes"] / 2**20 for r in rs])}
                            if all("child_maxrss_bytes" in r for r in rs) else {}),
                         "ppl": next((r["ppl"] for r in rs if "ppl" in r), None),
                         "real_sparsity": rs[0].get("real_sparsity")}
            above = [(r["peak_rss_bytes"] - r["rss_before_model_bytes"]) / 2**20 for r in rs
                     if "rss_before_model_bytes" in r]
            if above:
                per[impl]["peak_above_preload_mib"] = spread(above)
                per[impl]["added_during_prune_mib"] = spread(
                    [(r["peak_rss_bytes"] - r["rss_before_prune_bytes"]) / 2**20 for r in rs])
        for mine in ("prunetune", "prunetune-stream"):
            pt = per.get(mine)
            if not pt:
                continue
            for other in ("baseline", "llm-compressor"):
                if other in per:
                    o = per[other]
                    per[f"{mine} / {other}"] = {
                        "wall": pt["wall"]["median"] / o["wall"]["median"],
                        "cpu": pt["cpu"]["median"] / o["cpu"]["median"],
                        **({"sys": pt["sys"]["median"] / o["sys"]["median"]} if "sys" in pt and "sys" in o
                           and o["sys"]["median"] else {}),
                        "peak_rss": pt["peak_rss_mib"]["median"] / o["peak_rss_mib"]["median"],
                        **({"peak_above_preload": pt["peak_above_preload_mib"]["median"]
                            / o["peak_above_preload_mib"]["median"],
                            "added_during_prune": pt["added_during_prune_mib"]["median"]
                            / o["added_during_prune_mib"]["median"]} if "peak_above_preload_mib" in o else {}),
                        "ppl": (pt["ppl"] / o["ppl"]) if pt["ppl"] and o["ppl"] else None}
        out[m] = per
    return out


def table(summary: dict) -> str:
    lines = ["| method | implementation | runs | wall s median (min-max) | CPU s median | of it system s | "
             "page faults | peak RSS MiB median (min-max) | peak above pre-load MiB | RSS added during the call MiB | "
             "ppl (64 × 512) | sparsity |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, per in summary.items():
        for impl in IMPLS:
            if impl not in per:
                continue
            p = per[impl]
            above = p.get("peak_above_preload_mib")
            cells = [m, impl, str(p["wall"]["n"]),
                     f"{p['wall']['median']:.1f} ({p['wall']['min']:.1f}-{p['wall']['max']:.1f})",
                     f"{p['cpu']['median']:.1f}",
                     f"{p['sys']['median']:.1f}" if "sys" in p else "-",
                     f"{p['minor_faults']['median'] / 1e6:.2f} M" if "minor_faults" in p else "-",
                     f"{p['peak_rss_mib']['median']:.0f} ({p['peak_rss_mib']['min']:.0f}-{p['peak_rss_mib']['max']:.0f})",
                     f"{above['median']:.0f}" if above else "-",
                     f"{p['added_during_prune_mib']['median']:.0f}" if above else "-",
                     f"{p['ppl']:.2f}" if p["ppl"] else "-",
                     f"{p['real_sparsity']:.4%}" if p["real_sparsity"] is not None else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| method | prunetune path vs | wall | CPU | system | peak RSS | peak above pre-load | RSS added during "
              "the call | ppl |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m, per in summary.items():
        for mine, other in [(a, b) for a in ("prunetune", "prunetune-stream") for b in ("baseline", "llm-compressor")]:
            r = per.get(f"{mine} / {other}")
            if r:
                lines.append(f"| {m} | {mine.replace('prunetune', 'in memory').replace('in memory-stream', 'streaming')}"
                             f" vs {other} | {r['wall']:.2f}× | {r['cpu']:.2f}× | "
                             + (f"{r['sys']:.2f}× | " if "sys" in r else "- | ") + f"{r['peak_rss']:.2f}× | "
                             + (f"{r['peak_above_preload']:.2f}× | {r['added_during_prune']:.2f}× | "
                                if "peak_above_preload" in r else "- | - | ")
                             + (f"{r['ppl']:.4f}× |" if r["ppl"] else "- |"))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"], choices=list(METHODS))
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    ap.add_argument("--reps", type=int, default=5, help="repetitions of prunetune and llm-compressor")
    ap.add_argument("--baseline-reps", type=int, default=None, help="repetitions of the minimal baseline "
                    "(default: --reps)")
    ap.add_argument("--threads", type=int, default=1, help="OMP/torch threads of every child")
    ap.add_argument("--default-threads", action="store_true", help="set no thread count (torch's default, one per "
                    "core) and run prunetune as the `prunetune prune` command does (see the docstring)")
    ap.add_argument("--model", type=Path, default=ROOT / "runs" / "smollm2-hf")
    ap.add_argument("--calib", type=Path, default=ROOT / "runs" / "calib_ids.safetensors")
    ap.add_argument("--llmc-python", default=str(ROOT / ".venv-llmc" / "bin" / "python"))
    ap.add_argument("--no-ppl", action="store_true", help="skip the perplexity checks")
    ap.add_argument("--ppl-impls", nargs="+", default=list(IMPLS), choices=list(IMPLS),
                    help="implementations whose first repetition is scored (default: all)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_ppl", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_weights", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_cli", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_stream", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._child:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        args.method, args.ppl, args.weights, args.as_cli = args._child, args._ppl, args._weights, args._cli
        args.stream = args._stream
        Path(args._out).write_text(json.dumps(prunetune_child(args), default=str))
        return

    from _machine import cpu_model, load_average

    if "llm-compressor" in args.impls and not Path(args.llmc_python).exists():
        ap.error(f"{args.llmc_python} not found: create llm-compressor's environment (see the docstring)")
    prepare(args.model, args.calib, 32, 512)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PRUNETUNE_PROGRESS="0", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    if args.default_threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.pop(var)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    reps = {"prunetune": args.reps, "prunetune-stream": args.reps, "llm-compressor": args.reps, "baseline": args.baseline_reps or args.reps}
    started, load_start = time.strftime("%Y-%m-%d %H:%M:%S %Z"), load_average()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        for rep in range(max(reps.values())):
            order = list(args.impls[rep % len(args.impls):]) + list(args.impls[: rep % len(args.impls)])
            for method in args.methods:
                for impl in order:
                    if rep >= reps[impl] or (impl == "baseline" and "pattern" in METHODS[method]):
                        continue  # the minimal baseline prunes unstructured only
                    row = one_run(impl, method, args, env, ppl=rep == 0 and not args.no_ppl and impl in args.ppl_impls, tmp=tmp)
                    row["rep"] = rep
                    runs.append(row)
                    print(f"rep {rep} {method} {impl}: {row['prune_seconds']:.1f} s wall, "
                          f"{row['prune_cpu_seconds']:.1f} s CPU, peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB"
                          + (f", ppl {row['ppl']:.3f}" if "ppl" in row else "")
                          + f", load {row['load_average'][0]:.1f}", flush=True)
                    if args.json:  # an interrupted run leaves its complete repetitions summarised
                        write(args, runs, started, load_start, cpu_model(), partial=True)
    meta = write(args, runs, started, load_start, cpu_model(), partial=False)
    print()
    print(table(meta["summary"]))


def write(args: argparse.Namespace, runs: list[dict], started: str, load_start, cpu: str, partial: bool) -> dict:
    summary = summarise(runs, args.methods)
    loads = [r["load_average"][0] for r in runs]
    meta = {"started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "partial": partial, "cpu": cpu,
            "cores": os.cpu_count(), "load_average_start": list(load_start), "load_average_1min_during":
            {"min": min(loads), "median": statistics.median(loads), "max": max(loads)},
            "threads": "default" if args.default_threads else args.threads,
            "prunetune_as": "the prune command" if args.default_threads else "library call", "command": " ".join(["python", *sys.argv]), "summary": summary,
            "table": table(summary), "runs": runs}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(meta, indent=2, default=str))
    return meta


if __name__ == "__main__":
    main()
