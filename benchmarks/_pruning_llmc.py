"""One llm-compressor `oneshot` pruning run, the peer side of `benchmarks/pruning_peers.py`.

Runs in llm-compressor's own virtual environment (it pins its own transformers), so it imports nothing from
prunetune: it loads the same plain fp32 HF directory and the same calibration token ids as the prunetune side,
times `oneshot` (model already loaded; llm-compressor's dataset preparation, graph tracing for its sequential
pipeline, calibration and pruning all count), samples the process RSS every 20 ms meanwhile, and writes one
JSON row. With `--save-weights` it also writes the pruned decoder linears as safetensors, which the prunetune
side scores with its own perplexity evaluator. Underscored so that run_all.py does not take it for a benchmark.

    .venv-llmc/bin/python benchmarks/_pruning_llmc.py --model runs/smollm2-hf --calib runs/calib_ids.safetensors \
        --method sparsegpt --sparsity 0.5 --json OUT
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from _machine import PeakRSS, rss  # standard library only: importable in llm-compressor's venv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help="safetensors file with `input_ids` [n, seqlen]")
    ap.add_argument("--method", choices=("wanda", "sparsegpt"), required=True)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--pattern", default=None, help="N:M mask structure, e.g. 2:4")
    ap.add_argument("--save-weights", default=None, help="write the pruned decoder linears here (safetensors)")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rss_before_model = rss()
    ids = load_file(args.calib)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    kw = {"sparsity": 1 - int(args.pattern.split(":")[0]) / int(args.pattern.split(":")[1]),
          "mask_structure": args.pattern} if args.pattern else {"sparsity": args.sparsity}
    cls = SparseGPTModifier if args.method == "sparsegpt" else WandaPruningModifier
    recipe = cls(ignore=["re:.*lm_head"], **kw)
    rss_before_prune = rss()
    with PeakRSS() as peak:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0, c0 = time.perf_counter(), time.process_time()
        oneshot(model=model, processor=tok, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
                max_seq_length=ids.shape[1], shuffle_calibration_samples=False, pipeline="sequential")
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    linears = {f"{n}.weight": m.weight.detach() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}."}
    zeros = sum(int((w == 0).sum()) for w in linears.values())
    numel = sum(w.numel() for w in linears.values())
    row = {"impl": "llm-compressor", "version": llmcompressor.__version__, "method": args.method,
           "sparsity": kw["sparsity"], "pattern": args.pattern, "prune_seconds": seconds, "prune_cpu_seconds": cpu,
           "peak_rss_bytes": peak.peak, "rss_before_model_bytes": rss_before_model,
           "rss_before_prune_bytes": rss_before_prune, "real_sparsity": zeros / numel,
           "threads": torch.get_num_threads(), "calib_batch": 1,
           "prune_user_seconds": r1.ru_utime - r0.ru_utime, "prune_sys_seconds": r1.ru_stime - r0.ru_stime,
           "prune_minor_faults": r1.ru_minflt - r0.ru_minflt, "prune_major_faults": r1.ru_majflt - r0.ru_majflt}
    if args.save_weights:
        save_file({k: v.contiguous() for k, v in linears.items()}, args.save_weights)
    with open(args.json, "w") as fh:
        json.dump(row, fh, indent=2)


if __name__ == "__main__":
    main()
