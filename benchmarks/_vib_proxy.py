"""VIB search proxy (not a benchmark: underscored): one prune_structured row on SmolLM2, ppl on the first N
test windows of 512; appends a JSON line to $VIB_SEARCH_LOG (default vib_search.jsonl)."""
import json, os, time, argparse
import torch
ap = argparse.ArgumentParser()
ap.add_argument("--method", default="vib")
ap.add_argument("--sparsity", type=float, default=0.3)
ap.add_argument("--steps", type=int, default=16)
ap.add_argument("--batch", type=int, default=2)
ap.add_argument("--seqlen", type=int, default=256)
ap.add_argument("--lr", type=float, default=0.05)
ap.add_argument("--mu-lr", type=float, default=None)
ap.add_argument("--lag-lr", type=float, default=0.1)
ap.add_argument("--warm", type=float, default=0.2)
ap.add_argument("--init", type=float, default=-3.0)
ap.add_argument("--beta", type=float, default=1.0)
ap.add_argument("--anti", action="store_true")
ap.add_argument("--loss", default="lm")
ap.add_argument("--opt", default="adam")
ap.add_argument("--widths", default="learned")
ap.add_argument("--windows", type=int, default=8)
ap.add_argument("--nofold", action="store_true")
ap.add_argument("--tag", default="")
a = ap.parse_args()
from prunetune.models.loading import load_model
from prunetune.methods.shrink import prune_structured
from prunetune.methods.vib import StructuredSpec
from prunetune.pruning.shrink.scores import calibration_windows
from prunetune.data.sources import load_wikitext2
from prunetune.evaluation.perplexity import perplexity
torch.manual_seed(0)
L = load_model("smollm2-135m", "causal-lm"); model, tok = L.model.eval(), L.tokenizer
calib = calibration_windows(tok, "wikitext2", max(8, a.steps * a.batch), a.seqlen, seed=0)
t0 = time.perf_counter()
vib = StructuredSpec(vib_steps=a.steps, vib_batch=a.batch, vib_lr=a.lr, vib_mu_lr=a.mu_lr, lagrangian_lr=a.lag_lr,
                     lagrangian_warmup=a.warm, init_log_sigma2=a.init, vib_loss=a.loss, vib_widths=a.widths,
                     vib_lr_steps=None)  # constant lr at any --steps, as its recorded runs had
vib_options = dict(beta=a.beta, antithetic=a.anti, optimizer=a.opt)
ids = calib if a.method == "vib" else calib[:8]
model, facts = prune_structured(model, a.method, a.sparsity, structures="heads,neurons", round_to=64, ids=ids, vib=vib,
                                vib_options=vib_options)
tp = time.perf_counter() - t0
r = perplexity(model, tok, load_wikitext2("test"), seqlen=512, max_windows=a.windows, batch_size=4, progress=False)
out = {"tag": a.tag, "args": vars(a), "ppl": r["value"], "prune_s": tp, "ppl_s": r["seconds"], "widths": facts["widths"],
       "load": os.getloadavg()}
if "vib" in facts:
    v = facts["vib"]; out["thr"] = v.get("thresholded_sparsity"); out["last"] = v.get("last")
    out["kept_heads"] = v.get("kept", {}).get("heads"); out["mu"] = v.get("mu")
print(json.dumps(out), flush=True)
with open(os.environ.get("VIB_SEARCH_LOG", "vib_search.jsonl"), "a") as f:
    f.write(json.dumps(out) + "\n")
