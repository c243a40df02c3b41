"""Why LoSparse at 50 % kept lost to Wanda on SmolLM2, and what wins at which budget (issue 29 item 7).

The first LoSparse table's SmolLM2 rows (`benchmarks/losparse.py --smollm`) had LoSparse at 40.03 and Wanda at
35.51 after the same 16-step recovery. Three causes were suspected; this script separates them.

1. **The decomposition and the selection, with no training at all.** Each targeted linear W (q, k, v, o, gate,
   up, down) becomes U·V (truncated SVD at rank share r of the 50 % budget) + S⊙M, S = W − U·V, with M keeping
   the rest of the budget; r = 0 is plain pruning of W. M is chosen by |S| over all layers at once (one global
   threshold, as PLATON's selection does), by |S| per output row, or by |S|·‖x‖ per output row (Wanda's score
   on the residual, ‖x‖ from calibration windows of WikiText-2 valid through the dense model). Perplexity right
   after, no recovery. The engine's own Wanda (sequential, block by block) is the reference row.
2. **PLATON on a causal LM, and the budget.** LoSparse as the method runs it (PLATON scores over all S at once,
   cubic schedule), Wanda + recovery and dense + recovery, at `--steps` recovery lengths (the first table's 16
   and 4x that), rank share `--shares`. The JSON also holds rows with PLATON selecting per output row of each S
   (Wanda's granularity), run from commit 5d9173f whose LoSparse had a `select_scope` option; it measured worse
   than the global threshold and was removed.

Every row writes OUT/rows/<key>.json (skipped when it exists, so a stopped run resumes); the JSON is rewritten
after each row.

    OMP_NUM_THREADS=1 python benchmarks/losparse_smollm.py --out runs/bench-losparse-smollm
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import losparse as bench  # noqa: E402  (the SmolLM2 setup, recovery data and recovery loop of the first table)

SELECTIONS = ("global-magnitude", "row-magnitude", "row-wanda")


def sm_args(args, steps: int, share: float) -> SimpleNamespace:
    """The first table's SmolLM2 options (`losparse.py --sm-*`), with this row's recovery length and rank."""
    return SimpleNamespace(sm_model=args.model, sm_steps=steps, sm_batch=args.batch, sm_seqlen=args.seqlen,
                           sm_windows=args.windows, sm_lr=args.lr, sm_iw=max(1, steps // 8), sm_fw=3 * steps // 8,
                           sm_delta_t=max(1, steps // 8), sm_calib=args.calib, sm_rank_ratio=round(0.5 * share, 6))


# ------------------------------------------------------------------------------------------------ one-shot rows
def input_norms(model, tok, args) -> dict:
    """‖x_j‖₂ over the calibration tokens for every targeted linear's input feature j (the dense model's; the
    moments structured pruning collects)."""
    from prunetune.data.sources import load_text
    from prunetune.methods.losparse import targets
    from prunetune.pruning.calibrate import calibration_ids
    from prunetune.pruning.shrink.scores import collect_moments

    ids = calibration_ids(load_text("wikitext2", "valid", data_dir=os.environ.get("PRUNETUNE_DATA_DIR")), tok,
                          args.calib, args.seqlen, 0)
    stats = collect_moments(model, ids)
    return {name: stats[name].norm().float() for name in targets(model)}


def row_oneshot(args, share: float, selection: str) -> dict:
    """W → U·V + S⊙M at 50 % kept, no training; perplexity right after."""
    import torch

    from prunetune.methods.losparse import rank_for, targets
    from prunetune.pruning.granularity import global_masks, unstructured_mask

    model, tok, ppl = bench._smollm_setup(sm_args(args, 16, share))
    norms = input_norms(model, tok, args) if selection == "row-wanda" else {}
    found = targets(model)
    parts, dense, lowrank = {}, 0, 0
    with torch.no_grad():
        for name, (_, lin) in found.items():
            w = lin.weight.double()
            m, n = w.shape
            dense += m * n
            if share > 0:
                r = rank_for(m, n, 0.5 * share)
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                low = (u[:, :r] * s[:r]) @ vh[:r]
                lowrank += r * (m + n)
            else:
                low = torch.zeros_like(w)
            parts[name] = (low, w - low)
        keep_total = int(round(0.5 * dense)) - lowrank
        pruned = 1.0 - keep_total / dense  # of S's entries: the budget left after U·V
        if selection == "global-magnitude":
            masks = global_masks({name: sp.abs().float() for name, (_, sp) in parts.items()}, pruned)
        else:  # per output row: every row keeps the same fraction of its S (what Wanda keeps of W)
            masks = {name: unstructured_mask(sp.abs().float() * (norms[name][None, :] if selection == "row-wanda"
                                                                  else 1.0), pruned, per="row")
                     for name, (_, sp) in parts.items()}
        kept = 0
        per_layer = {}
        for name, (_, lin) in found.items():
            low, sp = parts[name]
            lin.weight.copy_((low + sp * masks[name]).to(lin.weight.dtype))
            kept_s = int(masks[name].sum())
            kept += kept_s
            per_layer[name] = kept_s / masks[name].numel()
    vals = sorted(per_layer.values())
    return {"kind": "oneshot", "share": share, "selection": selection, "ppl": ppl(model),
            "lowrank_fraction": lowrank / dense, "sparse_fraction": kept / dense,
            "kept_fraction": (lowrank + kept) / dense,
            "s_kept_per_layer": {"min": vals[0], "median": vals[len(vals) // 2], "max": vals[-1]}}


def row_engine_wanda(args) -> dict:
    from prunetune.data.sources import load_text
    from prunetune.pruning.api import prune

    model, tok, ppl = bench._smollm_setup(sm_args(args, 16, 0.0))
    calib = load_text("wikitext2", "valid", data_dir=os.environ.get("PRUNETUNE_DATA_DIR"))
    dense = ppl(model)
    prune(model, "wanda", 0.5, calib=calib, tokenizer=tok, nsamples=args.calib, seqlen=args.seqlen)
    return {"kind": "oneshot", "share": 0.0, "selection": "engine-wanda", "ppl": ppl(model), "dense": dense,
            "kept_fraction": 0.5, "lowrank_fraction": 0.0, "sparse_fraction": 0.5}


# ------------------------------------------------------------------------------------------------ trained rows
def row_trained(args, arm: str, steps: int, share: float) -> dict:
    key = {"LoSparse": "smollm2_LoSparse_50", "Wanda": "smollm2_Wanda_50", "dense": "smollm2_dense_recovered"}[arm]
    r = bench.row_smollm(sm_args(args, steps, share), key)
    after = r.get("losparse_after") or r.get("wanda_after") or r.get("dense_after")
    before = r.get("losparse_init") or r.get("wanda_pruned")
    out = {"kind": "trained", "arm": arm, "steps": steps, "share": share if arm == "LoSparse" else None,
           "scope": "global" if arm == "LoSparse" else None,
           "ppl": after, "ppl_before": before, "train_s": r["train_s"], "train_losses": r["train_losses"]}
    if arm == "LoSparse":
        out.update(counts=r["counts"], spec=r["spec"], events=r["events"])
    return out


# ------------------------------------------------------------------------------------------------ plan / render
def plan(args) -> list[tuple[str, dict]]:
    rows = [("oneshot_engine-wanda", {"fn": "engine"})]
    rows += [(f"oneshot_{sel}_r{int(round(sh * 100))}", {"fn": "oneshot", "share": sh, "selection": sel})
             for sh in args.oneshot_shares for sel in SELECTIONS]
    for steps in args.steps:
        rows += [(f"trained_dense_{steps}", {"fn": "trained", "arm": "dense", "steps": steps, "share": 0.0}),
                 (f"trained_Wanda_{steps}", {"fn": "trained", "arm": "Wanda", "steps": steps, "share": 0.0})]
        rows += [(f"trained_LoSparse_{steps}_r{int(round(sh * 100))}",
                  {"fn": "trained", "arm": "LoSparse", "steps": steps, "share": sh}) for sh in args.shares]
    return rows


def render(data: dict) -> str:
    rows = data["rows"]
    p = next(iter(rows.values()))["ppl"]["protocol"] if rows else {}
    lines = [f"- command: `{data['command']}`", f"- code: {data['code']}", f"- machine: {data['machine']}",
             f"- protocol: perplexity on {p.get('dataset')} ({p.get('variant')}), windows of {p.get('seqlen')} tokens, "
             f"first {p.get('windows')} windows; calibration {data['sizes']['calib']} x {data['sizes']['seqlen']} "
             f"tokens of WikiText-2 valid; recovery {data['sizes']['batch']} x {data['sizes']['seqlen']} tokens per "
             f"step, AdamW lr {data['sizes']['lr']} over every weight, linear decay", "",
             "No training: W → U·V + S⊙M at 50 % kept, perplexity right after (the dense model: "
             f"{data['dense_ppl']:.2f})", "",
             "| rank share of the budget | rank part | S kept by | ppl | S kept per layer (min / median / max) |",
             "|---|---|---|---|---|"]
    for k, r in rows.items():
        if r["kind"] != "oneshot":
            continue
        per = r.get("s_kept_per_layer")
        per_s = f"{per['min']:.1%} / {per['median']:.1%} / {per['max']:.1%}" if per else "50% of every row"
        sel = {"engine-wanda": "Wanda (the engine's, block by block)", "global-magnitude": "|S|, one global threshold",
               "row-magnitude": "|S| per output row", "row-wanda": "|S|·‖x‖ per output row"}[r["selection"]]
        lines.append(f"| {r['share']:.0%} | {r['lowrank_fraction']:.1%} | {sel} | {r['ppl']['value']:.2f} | {per_s} |")
    lines += ["", "With recovery (LoSparse: PLATON over all S at once, cubic schedule; warm-ups steps/8 + 3·steps/8, "
              "a mask every steps/8):", "",
              "| recovery steps | arm | rank share | S selected | ppl before recovery | ppl after | train s |",
              "|---|---|---|---|---|---|---|"]
    arms = {"dense": 0, "Wanda": 1, "LoSparse": 2}
    trained = sorted((r for r in rows.values() if r["kind"] == "trained"),
                     key=lambda r: (r["steps"], arms[r["arm"]], -(r["share"] or 0), r.get("scope") != "global"))
    for r in trained:
        before = f"{r['ppl_before']['value']:.2f}" if r.get("ppl_before") else "-"
        share = f"{r['share']:.0%}" if r["share"] is not None else "-"
        scope = {"global": "PLATON, one global threshold", "layer": "PLATON, per S", "row": "PLATON, per output row",
                 None: "-"}[r.get("scope")]
        lines.append(f"| {r['steps']} | {r['arm']} | {share} | {scope} | {before} | {r['ppl']['value']:.2f} | "
                     f"{r['train_s']:.0f} |")
    if data.get("missing"):
        lines += ["", f"Rows not run yet: {', '.join(data['missing'])}"]
    return "\n".join(lines)


def pack(args, argv, entries) -> dict:
    from _machine import cpu_model

    rows_dir = Path(args.out) / "rows"
    # every row in OUT, in plan order, then rows of earlier plans (the per-row PLATON rows ran from commit
    # 5d9173f, whose LoSparse had a select_scope option; it measured worse and was removed)
    keys = [k for k, _ in entries] + sorted(p.stem for p in rows_dir.glob("*.json"))
    rows = {k: json.loads((rows_dir / f"{k}.json").read_text()) for k in dict.fromkeys(keys)
            if (rows_dir / f"{k}.json").is_file()}
    loads = [x for r in rows.values() for x in (r["loadavg_start"][0], r["loadavg"][0])]
    revs = sorted({r["code"]["rev"] + (" + uncommitted changes" if r["code"]["dirty"] else "") for r in rows.values()})
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
    command = " ".join(x for x in (env, "python benchmarks/losparse_smollm.py", " ".join(argv)) if x)
    data = {"command": command, "code": f"rows ran from commit {', '.join(revs) or '-'}",
            "machine": f"{os.cpu_count()} cores, {cpu_model()}; 1-min load average "
                       f"{min(loads, default=0):.1f}–{max(loads, default=0):.1f} at the rows' starts and ends",
            "sizes": {k: getattr(args, k) for k in ("model", "batch", "seqlen", "windows", "lr", "calib")},
            "dense_ppl": rows.get("oneshot_engine-wanda", {}).get("dense", {}).get("value", float("nan")),
            "rows": rows, "missing": [k for k, _ in entries if k not in rows]}
    args.results.write_text(json.dumps(data, indent=2, default=str))
    return data


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench-losparse-smollm")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "losparse_smollm.json")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, nargs="+", default=[16, 64])
    p.add_argument("--shares", type=float, nargs="+", default=[0.5, 0.2], help="rank share of the 50%% budget")
    p.add_argument("--oneshot-shares", type=float, nargs="+", default=[0.0, 0.2, 0.5])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--calib", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--render", action="store_true", help="print the markdown of --results; run nothing")
    args = p.parse_args(argv)
    if args.render:
        print(render(json.loads(args.results.read_text())))
        return 0
    import torch

    torch.set_num_threads(args.threads)
    entries = plan(args)
    rows_dir = Path(args.out) / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    for key, e in entries:
        path = rows_dir / f"{key}.json"
        if path.is_file():
            continue
        t0, load0, code = time.perf_counter(), os.getloadavg(), bench.code_state()
        print(f"[{time.strftime('%H:%M:%S')}] {key} started", flush=True)
        if e["fn"] == "engine":
            r = row_engine_wanda(args)
        elif e["fn"] == "oneshot":
            r = row_oneshot(args, e["share"], e["selection"])
        else:
            r = row_trained(args, e["arm"], e["steps"], e["share"])
        r.update(wall_s=time.perf_counter() - t0, loadavg_start=load0, loadavg=os.getloadavg(), code=code)
        path.write_text(json.dumps(r, indent=2, default=str))
        print(f"[{time.strftime('%H:%M:%S')}] {key}: ppl {r['ppl']['value']:.2f}  {r['wall_s']:.0f}s", flush=True)
        pack(args, argv, entries)
    data = pack(args, argv, entries)
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
