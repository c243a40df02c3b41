"""Regenerate BENCHMARKS.md with one command: run every benchmark script, put its output under its marker.

Each script prints markdown; this runner wraps it with the command, machine, date and the script's protocol
(its docstring) and writes it between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->` right after
the `<!-- BENCH:NAME -->` marker. Hand-written notes outside the generated block are kept.

    PRUNETUNE_DATA_DIR=../shared/data/wikitext-2 python benchmarks/run_all.py [--only pruning,payt,pipelines] [--dry-run]
    python benchmarks/run_all.py --check        # rebuild every JSON-backed block; fail on any difference
    python benchmarks/run_all.py --render       # rewrite those blocks from their JSON

A JSON-backed block is written from a committed raw result, never by hand::

    <!-- generated:NAME render=RENDERER json=benchmarks/results/FILE.json -->
    ... (what RENDERER makes of FILE.json) ...
    <!-- /generated:NAME -->

`--check` is cheap (no model, no benchmark run), so CI runs it (tests/test_benchmarks_check.py).
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"
ORDER = ("pruning", "payt", "pipelines")  # then any other benchmarks/*.py


def scripts() -> list[str]:
    found = sorted(p.stem for p in BENCH_DIR.glob("*.py") if p.stem not in ("run_all", "__init__")
                   and not p.stem.startswith("_"))
    return [s for s in ORDER if s in found] + [s for s in found if s not in ORDER]


def machine() -> str:
    """The machine as BENCHMARKS.md describes it: CPU model, cores and load average, nothing else."""
    from _machine import cpu_model, load_average

    cpu, load = cpu_model(), load_average()
    return f"{os.cpu_count()} cores, {cpu}; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)"


def protocol(script: Path) -> str:
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    paras = [p.strip() for p in doc.split("\n\n") if p.strip() and not p.strip().startswith(("PRUNETUNE_", "python "))]
    return " ".join(" ".join(paras[:2]).split())


def replace_block(text: str, name: str, body: str) -> str:
    """Put `body` in the generated block of `name` (created after the BENCH marker, or at the end)."""
    start, end = f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        return re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    marker = f"<!-- BENCH:{name} -->"
    if marker in text:
        return text.replace(marker, f"{marker}\n{block}", 1)
    return text.rstrip() + f"\n\n{marker}\n{block}\n"


# --------------------------------------------------------------------------------------------- JSON-backed blocks
def _pct(mu: float, sd: float | None = None) -> str:
    return f"{mu:.2%}" if sd is None else f"{mu:.2%} ± {sd:.2%}"


def render_payt_seeds(data: dict) -> str:
    """Per-seed rows and mean ± sample sd per configuration, from `benchmarks/payt.py --results` JSON."""
    import statistics

    seeds = data["seeds"]
    labels: list[str] = []
    for res in seeds.values():
        labels += [k for k in res["runs"] if k not in labels]
    lines = [f"- command: `{data['command']}`", f"- code: commit {data['commit']}",
             f"- machine: {data['machine']}", f"- test set: {data['test_set']}", "",
             "| run | KD | mixing | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd (accuracy) "
             "| mean ± sd (retention) |", "|---|---|---|" + "---|" * len(seeds) + "---|---|"]
    for label in labels:
        rows = [res["runs"].get(label) for res in seeds.values()]
        acc = [r["accuracy"] for r in rows if r and r.get("accuracy") is not None]
        ret = [r["retention"] for r in rows if r and r.get("retention") is not None]
        first = next(r for r in rows if r)
        cells = []
        for r in rows:
            if not r:
                cells.append("-")
            elif r.get("accuracy") is None:
                cells.append(f"- / {r['retention']:.4f}" if r.get("retention") is not None else "-")
            else:
                cells.append(_pct(r["accuracy"]) + (f" / {r['retention']:.4f}" if r.get("retention") is not None
                                                   else ""))
        m_acc = _pct(statistics.mean(acc), statistics.stdev(acc) if len(acc) > 1 else 0.0) if acc else "-"
        m_ret = (f"{statistics.mean(ret):.4f} ± {statistics.stdev(ret) if len(ret) > 1 else 0.0:.4f}"
                 if ret else "-")
        lines.append(f"| {label} | {first.get('kd') or '-'} | {first.get('mixing') or '-'} | " + " | ".join(cells)
                     + f" | {m_acc} | {m_ret} |")
    lines += ["", "(cells: accuracy of the exported model / retention; "
              f"{data.get('note', '')})".replace("; )", ")")]
    return "\n".join(lines)


def render_payt_summary(data: dict) -> str:
    """The mean ± sd tables and target checks stored by `benchmarks/payt.py --seeds ...` in its summary.json."""
    import json

    parts = []
    for key, val in data.items():
        if key.endswith(" mean"):
            parts += [f"**{key[:-5]}, mean ± sd over the seeds**", "", val["markdown"], "",
                      f"targets on the means: `{json.dumps(val['targets'])}`"]
    n = sum(1 for v in data.values() if "command" in v)
    parts += ["", f"({n} per-seed runs; their exact commands are in the JSON)"]
    return "\n".join(parts)


def _script_render(script: str, fn: str = "render"):
    """A renderer that is a benchmark script's own function (one definition of each table; no torch import)."""
    def render(data: dict) -> str:
        import importlib.util

        spec = importlib.util.spec_from_file_location(f"_bench_{script}", BENCH_DIR / f"{script}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return getattr(mod, fn)(data)

    render.__doc__ = f"benchmarks/{script}.py's own `{fn}`"
    return render


render_composability = _script_render("composability")
render_losparse = _script_render("losparse")
render_losparse_smollm = _script_render("losparse_smollm")
render_structured = _script_render("structured", "table")
render_memory_scaling = _script_render("memory_scaling")


RENDERERS = {"payt_seeds": render_payt_seeds, "payt_summary": render_payt_summary,
             "composability": render_composability, "losparse": render_losparse, "structured": render_structured,
             "losparse_smollm": render_losparse_smollm,
             "memory_scaling": render_memory_scaling}
BLOCK = re.compile(r"<!-- generated:(?P<name>[\w.-]+) render=(?P<render>\w+) json=(?P<json>\S+) -->\n"
                   r"(?P<body>.*?)\n?<!-- /generated:(?P=name) -->", re.S)


def rebuilt(text: str) -> tuple[str, list[str]]:
    """`text` with every JSON-backed block re-rendered, and the names of the blocks that differed."""
    import json

    changed: list[str] = []

    def one(m: re.Match) -> str:
        fn = RENDERERS.get(m["render"])
        if fn is None:
            raise SystemExit(f"block {m['name']}: unknown renderer '{m['render']}' (known: {', '.join(RENDERERS)})")
        path = ROOT / m["json"]
        if not path.is_file():
            raise SystemExit(f"block {m['name']}: {m['json']} is not in the repository")
        body = fn(json.loads(path.read_text())).strip()
        if body != m["body"].strip():
            changed.append(m["name"])
        return f"<!-- generated:{m['name']} render={m['render']} json={m['json']} -->\n{body}\n" \
               f"<!-- /generated:{m['name']} -->"

    return BLOCK.sub(one, text), changed


def check_or_render(file: Path, write: bool) -> int:
    text = file.read_text()
    new, changed = rebuilt(text)
    n = len(BLOCK.findall(text))
    if write:
        file.write_text(new)
        print(f"{file.name}: {n} JSON-backed blocks rendered ({len(changed)} changed)")
        return 0
    if changed:
        import difflib

        sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True), str(file),
                                                   "rebuilt from JSON"))
        print(f"{file.name}: {len(changed)} of {n} JSON-backed blocks differ from their JSON: {', '.join(changed)}")
        return 1
    print(f"{file.name}: all {n} JSON-backed blocks match their JSON")
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(scripts())}")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--check", action="store_true", help="rebuild the JSON-backed blocks; exit 1 on any difference")
    ap.add_argument("--render", action="store_true", help="rewrite the JSON-backed blocks from their JSON")
    ap.add_argument("--file", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    if args.check or args.render:
        sys.exit(check_or_render(args.file, write=args.render))
    names = scripts() if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in scripts()]
    if unknown:
        raise SystemExit(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(scripts())}")
    env = {**os.environ, "PRUNETUNE_PROGRESS": "0"}
    env.setdefault("PRUNETUNE_DATA_DIR", str(ROOT.parent / "shared" / "data" / "wikitext-2"))
    for name in names:
        cmd = [sys.executable, f"benchmarks/{name}.py"]
        data_dir = env["PRUNETUNE_DATA_DIR"]
        if Path(data_dir).resolve() == (ROOT.parent / "shared" / "data" / "wikitext-2").resolve():
            data_dir = "../shared/data/wikitext-2"
        shown = f"PRUNETUNE_DATA_DIR={data_dir} python benchmarks/{name}.py"
        if args.dry_run:
            print(shown)
            continue
        print(f"== {shown}", flush=True)
        date = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        mach = machine()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        sys.stderr.write(proc.stderr[-4000:])
        if proc.returncode != 0:
            print(f"{name}: exit code {proc.returncode}; BENCHMARKS.md section left as it was", flush=True)
            continue
        # the scripts echo the commands they spawn ("$ ..."): keep those lines as part of the record
        body = (f"_Generated by `python benchmarks/run_all.py` on {date} ({wall / 60:.1f} min)._\n\n"
                f"- command: `{shown}`\n- machine: {mach}\n- protocol: {protocol(BENCH_DIR / f'{name}.py')}\n\n"
                + proc.stdout.strip())
        text = args.file.read_text() if args.file.is_file() else "# Benchmarks\n"
        args.file.write_text(replace_block(text, name, body))
        print(f"{name}: {wall:.0f} s, written to {args.file}", flush=True)


if __name__ == "__main__":
    main()
