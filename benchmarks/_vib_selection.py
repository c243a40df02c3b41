"""VIB search (not a benchmark: underscored): which half of a VIB selection loses to FLAP?

Loads trained centred gates (a `gates_*_center.safetensors` file that `structured.py` writes into its work dir),
then builds SmolLM2 exports at the same uniform widths with the KV groups and the neurons each taken from VIB's
or FLAP's ranking, and measures perplexity on the first --windows WikiText-2 test windows:

* `vib`: VIB's selection, μ folded, centred means as biases (what `structured.py` exports);
* `mu1`: VIB's selection without the μ fold (μ = 1; the means still go into the biases);
* `flap`: FLAP's selection under VIB's centred bias rule (μ = 1);
* `vibheads` / `vibneurons`: VIB's KV groups with FLAP's neurons / FLAP's KV groups with VIB's neurons (μ folded).

    PRUNETUNE_DATA_DIR=../shared/data/wikitext-2 OMP_NUM_THREADS=1 python benchmarks/_vib_selection.py \
        --gates /tmp/prunetune-structured-bench/gates_heads-neurons_0.5_16_center.safetensors --sparsity 0.5
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from structured import load, ppl  # noqa: E402  (this directory's benchmark: same loading and perplexity)

from prunetune.pruning.shrink.scores import baseline_scores, calibration_windows, collect_moments
from prunetune.pruning.shrink.surgery import shrink_selection
from prunetune.pruning.shrink.widths import geometry, select
from prunetune.methods.vib import StructuredSpec, VibMethod  # noqa: E402

VARIANTS = ("vib", "mu1", "flap", "vibheads", "vibneurons")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gates", required=True, help="safetensors of trained centred heads+neurons gates")
    ap.add_argument("--sparsity", type=float, required=True,
                    help="the fraction of block parameters they were trained for")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--out", default="", help="append the results as one JSON line")
    args = ap.parse_args()
    _, tok = load("smollm2-135m")
    calib = calibration_windows(tok, "wikitext2", 8, 256, seed=0)  # structured.py's calibration windows
    state = load_file(args.gates)
    res: dict = {"gates": Path(args.gates).name, "sparsity": args.sparsity, "windows": args.windows,
                 "loadavg": os.getloadavg()}
    variants = args.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant '{bad[0]}'; choose from {', '.join(VARIANTS)}")
    dense, _ = load("smollm2-135m")
    geom = geometry(dense)
    stats = collect_moments(dense, calib, 4)  # the dense model's (every variant starts from it): means and FLAP
    flap = baseline_scores(dense, "flap", stats)
    del dense
    for var in variants:
        model, _ = load("smollm2-135m")
        meth = VibMethod(StructuredSpec(sparsity=args.sparsity, structures=["heads", "neurons"], round_to=64,
                                        vib_center=True, vib_widths="uniform"))
        meth.set_means(model, stats)
        meth.prepare(model)
        meth.gates.load_state_dict(state)
        meth.gates.eval()
        widths = meth.widths(geom)
        sel = select(meth.scores(), widths, geom)
        if var not in ("vib", "mu1"):
            fsel = select({k: v for k, v in flap.items() if k in ("heads", "neurons")}, widths, geom)
            sel = {"flap": fsel, "vibheads": replace(sel, neurons=fsel.neurons),
                   "vibneurons": replace(sel, kv=fsel.kv)}[var]
        if var in ("mu1", "flap"):
            with torch.no_grad():
                for bank in meth.gates.banks.values():
                    bank.mu.fill_(1.0)
        meth.fold(model, sel)
        model = shrink_selection(model, sel, ("heads", "neurons"))
        res[var] = ppl(model.eval(), tok, args.windows)["ppl"]
        print(var, res[var], flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
