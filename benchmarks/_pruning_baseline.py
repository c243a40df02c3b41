"""A minimal Wanda / SparseGPT written from the papers, on plain torch + transformers: the engine's baseline.

Kept unchanged once committed (issue 17: "commit the baseline script first and leave it unchanged"), so the
engine is compared against a fixed reference. What it does per decoder block, as both papers describe:

1. one pass of the block over the calibration activations with forward hooks on its linears, accumulating
   ‖X_j‖₂² per input feature (Wanda) or H = 2/n Σ XᵀX (SparseGPT);
2. prune every linear of the block: Wanda keeps the largest |W_ij|·‖X_j‖₂ of each output row; SparseGPT
   sweeps the columns in blocks of 128 with the upper Cholesky factor of H⁻¹ (1% dampening), choosing in each
   block the lowest w²/[H⁻¹]_jj² over the whole block, and spreading each pruned weight's error over the
   later columns (OBS);
3. one more pass of the (now pruned) block to produce the next block's inputs.

Llama-family decoders only (`model.model.layers`, rotary embeddings passed as the model passes them). The
peak RSS is sampled every 20 ms while pruning; perplexity uses the same windows as benchmarks/pruning.py.

    PRUNETUNE_DATA_DIR=../shared/data/wikitext-2 python benchmarks/_pruning_baseline.py --method wanda --json OUT
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch import nn


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_inputs(model, ids: torch.Tensor, batch: int) -> list[tuple[torch.Tensor, dict]]:
    """What the first decoder layer receives for each calibration batch (hidden states + keyword arguments)."""
    layer0 = model.model.layers[0]
    seen: list[tuple[torch.Tensor, dict]] = []

    def hook(_m, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        seen.append((hidden, kwargs))
        raise _Stop

    h = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for s in range(0, ids.shape[0], batch):
            try:
                model(input_ids=ids[s : s + batch], use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return seen


def _out(o):
    return o if isinstance(o, torch.Tensor) else o[0]


@torch.no_grad()
def wanda_layer(lin: nn.Linear, sq_norm: torch.Tensor, sparsity: float) -> None:
    W = lin.weight.data
    metric = W.abs().float() * sq_norm.sqrt().reshape(1, -1)
    k = int(W.shape[1] * sparsity)
    idx = torch.sort(metric, dim=1, stable=True).indices[:, :k]
    W.scatter_(1, idx, 0.0)


@torch.no_grad()
def sparsegpt_layer(lin: nn.Linear, H: torch.Tensor, sparsity: float, blocksize: int = 128,
                    percdamp: float = 0.01) -> None:
    W = lin.weight.data.clone().float()
    cols = W.shape[1]
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        sal = W1.pow(2) / d.reshape(1, -1).pow(2)
        k = int(sal.numel() * sparsity)
        prune = torch.zeros_like(W1, dtype=torch.bool)
        prune.view(-1)[torch.sort(sal.reshape(-1), stable=True).indices[:k]] = True
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            w = W1[:, i]
            q = torch.where(prune[:, i], torch.zeros_like(w), w)
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    lin.weight.data.copy_(W.to(lin.weight.dtype))


@torch.no_grad()
def prune_model(model, ids: torch.Tensor, method: str, sparsity: float, batch: int = 4) -> None:
    inputs = capture_inputs(model, ids, batch)
    for layer in model.model.layers:
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        stats: dict[str, list] = {}

        def make(name: str, lin: nn.Linear):
            n_in = lin.in_features
            if method == "wanda":
                stats[name] = [torch.zeros(n_in, dtype=torch.float64)]
            else:
                stats[name] = [torch.zeros(n_in, n_in), 0]

            def hook(_m, inp, _o):
                x = inp[0].reshape(-1, n_in).float()
                st = stats[name]
                if method == "wanda":
                    st[0] += x.pow(2).sum(0).double()
                else:
                    b = inp[0].shape[0]
                    st[0].mul_(st[1] / (st[1] + b))
                    st[1] += b
                    st[0].add_(x.t() @ x, alpha=2.0 / st[1])
            return lin.register_forward_hook(hook)

        handles = [make(n, m) for n, m in linears.items()]
        for hidden, kwargs in inputs:
            layer(hidden, **kwargs)
        for h in handles:
            h.remove()
        for n, lin in linears.items():
            if method == "wanda":
                wanda_layer(lin, stats[n][0].float(), sparsity)
            else:
                sparsegpt_layer(lin, stats[n][0], sparsity)
        del stats
        inputs = [(_out(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=("wanda", "sparsegpt"), required=True)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=64, help="WikiText-2 test windows for perplexity (0 = none)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from pruning import PeakRSS  # the same sampler as the engine's benchmark

    from prunetune.data.calibration import calibration_samples
    from prunetune.data.sources import load_text
    from prunetune.models.loading import load_model

    loaded = load_model("smollm2-135m", "causal-lm")  # loading only: the pruning below is plain torch
    model, tok = loaded.model.eval(), loaded.tokenizer
    ids = calibration_samples(tok, load_text("wikitext2", "valid").text, args.nsamples, args.seqlen, 0)
    with PeakRSS() as rss:
        t0, c0 = time.perf_counter(), time.process_time()
        prune_model(model, ids, args.method, args.sparsity)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    zeros = sum(int((m.weight == 0).sum()) for m in model.model.layers.modules() if isinstance(m, nn.Linear))
    numel = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, nn.Linear))
    row = {"impl": "baseline", "method": args.method, "sparsity": args.sparsity, "prune_seconds": seconds,
           "prune_cpu_seconds": cpu, "peak_rss_bytes": rss.peak, "real_sparsity": zeros / numel}
    if args.windows:
        from prunetune.evaluation.perplexity import perplexity

        row["ppl"] = perplexity(model, tok, load_text("wikitext2", "test"), seqlen=args.seqlen,
                                max_windows=args.windows)["value"]
    print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))
    assert math.isfinite(row.get("ppl", 0.0))


if __name__ == "__main__":
    main()
