"""Diagnostic for issue 29 item 8: at 1x and 4x the gate budget (pure VIB, centred, 50%, Adam multipliers, the
settings of structured_budget_adam4x.json), does the 4x degradation come from the units the gates rank (the
selection) or from the mu rescale the fold writes into the kept weights? Perplexity on 16 windows of 512.

    PRUNETUNE_DATA_DIR=../shared/data/wikitext-2 python benchmarks/_vib_fold_probe.py   # from the repository root
"""

import copy
import json
import sys
import time

sys.path.insert(0, "benchmarks")
import torch
from structured import load, ppl
from prunetune.methods.shrink import prune_structured
from prunetune.methods.vib.spec import StructuredSpec
from prunetune.pruning.shrink.scores import calibration_windows

torch.set_num_threads(2)
dense, tok = load("smollm2-135m")
calib = calibration_windows(tok, "wikitext2", 64 * 2, 256, seed=0)
out = {}
gates = {}
opts = {"beta": 1.0, "antithetic": False, "lr_decay": 1.0, "compensate": False, "optimizer": "adam",
        "constraint": "global"}


def shrink(spec: StructuredSpec, **gates_io):
    """VIB at 50% on a copy of the dense model with this probe's settings; `gates_io`: gates_out= to keep the
    trained gates, or gate_state= to export from given gates without training."""
    return prune_structured(copy.deepcopy(dense), "vib", 0.5, structures="heads,neurons", round_to=64, ids=calib,
                            vib=spec, vib_options=opts, **gates_io)


def log_alpha(g: dict, kind: str) -> torch.Tensor:
    """log σ² − log μ² of one gate kind from a saved gate state (the score the selection ranks by, negated)."""
    return g[f"banks.{kind}.log_sigma2"] - torch.log(g[f"banks.{kind}.mu"] ** 2)


for steps in (16, 64):
    spec = StructuredSpec(vib_steps=steps, vib_batch=2, vib_lr=0.2, vib_mu_lr=0.01, init_log_sigma2=-2.0,
                          lagrangian_warmup=0.3, lagrangian_lr=10.0, vib_loss="kd", vib_widths="uniform",
                          vib_center=True, vib_neuron_ranking="vib", split="equal", lagrangian_step="adam",
                          vib_lr_steps=None)  # the constant lr these runs had (before vib_lr_steps)
    g = {}
    t0 = time.time()
    m, facts = shrink(spec, gates_out=g)
    a = ppl(m, tok, 16)["ppl"]
    g1 = {k: (torch.ones_like(v) if k.endswith(".mu") else v) for k, v in g.items()}
    m1, _ = shrink(spec, gate_state=g1)
    b = ppl(m1, tok, 16)["ppl"]
    gates[steps] = g
    mu = {k: (float(v.min()), float(v.max())) for k, v in g.items() if k.endswith(".mu")}
    out[steps] = {"ppl_as_method": a, "ppl_mu_set_to_1": b, "mu_range": mu,
                  "thresholded_sparsity": facts["vib"].get("thresholded_sparsity"), "seconds": time.time() - t0}
    print(steps, out[steps], flush=True)
# overlap of the kept neurons / KV groups (top by -log alpha per layer, the 50% widths 2 KV / 704 neurons)
def keep(g, kind, k):
    la = log_alpha(g, kind)
    return [set(torch.topk(-la[l], k).indices.tolist()) for l in range(la.shape[0])]
for kind, k in (("neurons", 704), ("heads", 2)):
    a, b = keep(gates[16], kind, k), keep(gates[64], kind, k)
    out[f"overlap_{kind}"] = sum(len(x & y) for x, y in zip(a, b)) / sum(len(x) for x in a)
# the 1x selection with the 4x mu, and the 4x selection with the 1x mu
for name, sel, mus in (("sel16_mu64", 16, 64), ("sel64_mu16", 64, 16)):
    gs = dict(gates[sel])
    for kind in ("heads", "neurons"):
        # keep sel's ranking: set log_sigma2 so that -log alpha ranks as sel's, mu taken from mus
        gs[f"banks.{kind}.mu"] = gates[mus][f"banks.{kind}.mu"]
        gs[f"banks.{kind}.log_sigma2"] = log_alpha(gates[sel], kind) + torch.log(gs[f"banks.{kind}.mu"] ** 2)
    m2, _ = shrink(spec, gate_state=gs)  # spec: the last loop's (64 steps), as before; with gate_state it only exports
    out[name] = ppl(m2, tok, 16)["ppl"]
    print(name, out[name], flush=True)
json.dump(out, open("benchmarks/results/vib_fold_probe.json", "w"), indent=2)
