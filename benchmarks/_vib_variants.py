"""VIB search (not a benchmark: underscored): train gates once on SmolLM2 at 30%, then evaluate selection
variants from the same gates (uniform/learned widths, with/without the μ fold and FLAP compensation)."""
import json, os, time, copy, argparse
ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=16); ap.add_argument("--batch", type=int, default=2)
ap.add_argument("--lr", type=float, default=0.2); ap.add_argument("--mu-lr", type=float, default=0.01)
ap.add_argument("--lag-lr", type=float, default=1.0); ap.add_argument("--warm", type=float, default=0.3)
ap.add_argument("--init", type=float, default=-2.0); ap.add_argument("--loss", default="kd")
ap.add_argument("--windows", type=int, default=8); ap.add_argument("--tag", default="")
a = ap.parse_args()
from prunetune.models.loading import load_model
from prunetune.pruning.shrink.scores import calibration_windows, collect_moments
from prunetune.pruning.shrink.surgery import flap_compensate, shrink_selection
from prunetune.pruning.shrink.widths import geometry, select
from prunetune.methods.vib import StructuredSpec, VibMethod, train_gates
from prunetune.data.sources import load_wikitext2
from prunetune.evaluation.perplexity import perplexity
L = load_model("smollm2-135m", "causal-lm"); model, tok = L.model.eval(), L.tokenizer
base = copy.deepcopy(model)
ids = calibration_windows(tok, "wikitext2", max(8, a.steps * a.batch), 256, seed=0)
stats = collect_moments(base, ids[:8], 4)
cfg = StructuredSpec(sparsity=0.3, structures=["heads", "neurons"], vib_steps=a.steps, vib_batch=a.batch, vib_lr=a.lr,
                     vib_mu_lr=a.mu_lr, lagrangian_lr=a.lag_lr, lagrangian_warmup=a.warm, init_log_sigma2=a.init,
                     vib_loss=a.loss, vib_lr_steps=None)  # constant lr at any --steps, as its recorded runs had
t0 = time.perf_counter()
meth = VibMethod(cfg); train_gates(model, meth, ids)
state = {k: v.detach().clone() for k, v in meth.gates.state_dict().items()}
summ = meth.summary(); tt = time.perf_counter() - t0
geom = geometry(base)
res = {"tag": a.tag, "args": vars(a), "train_s": tt, "thr": summ["thresholded_sparsity"], "mu": summ["mu"],
       "last": summ.get("last"), "learned": meth.learned_widths()}
for wmode in ("uniform", "learned"):
    for comp in (False, True):
        for fold in (True, False):
            if wmode == "learned" and not fold: continue
            m = copy.deepcopy(base)
            v = VibMethod(cfg.model_copy(update={"vib_widths": wmode}))
            v.prepare(m); v.gates.load_state_dict(state)
            sel = select(v.scores(), v.widths(geom), geom)
            if comp: flap_compensate(m, sel, stats)
            if fold: v.fold(m, sel)
            else:
                v.remove_hooks()
            shrink_selection(m, sel, cfg.structures)
            r = perplexity(m, tok, load_wikitext2("test"), seqlen=512, max_windows=a.windows, batch_size=4, progress=False)
            key = f"{wmode}{'+comp' if comp else ''}{'' if fold else ' nofold'}"
            res[key] = {"ppl": r["value"], "widths": sel.widths().to_dict()}
            print(key, res[key], flush=True)
res["load"] = os.getloadavg()
print(json.dumps(res), flush=True)
open(os.environ.get("VIB_SEARCH_LOG", "vib_search.jsonl"), "a").write(json.dumps(res) + "\n")
