"""Write a random-weight Llama checkpoint of any size without holding it in memory (for memory benchmarks).

Values do not matter for memory and time, shapes do: the skeleton is built on the meta device, each tensor is
drawn (normal, std 0.02; norms at 1) and written into its slot of a safetensors shard by prunetune's own
`ShardWriter`, so a checkpoint larger than RAM is written with one tensor in memory. The tokenizer is
SmolLM2's (vocabulary 49,152), so the usual calibration sources tokenise for it.

    python benchmarks/_make_random_llama.py --layers 64 --out /tmp/llama-64      # width 1024, ~0.82B params
    python benchmarks/_make_random_llama.py --layers 42 --hidden 5120 --intermediate 13824 --heads 40 \
        --kv-heads 40 --dtype bf16 --out /big/llama-13b                          # ~13.6B params, 27 GB
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make(out: Path, *, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, dtype: str,
         shard_bytes: int, seed: int = 0, tokenizer: Path | None = None) -> dict:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from prunetune.models.loading import local_hf_dir
    from prunetune.pruning.stream import INDEX_FILE, ShardWriter

    tok = AutoTokenizer.from_pretrained(tokenizer or local_hf_dir("smollm2-135m"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, rms_norm_eps=1e-5)
    cfg.dtype = str(DTYPES[dtype]).removeprefix("torch.")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    dt = DTYPES[dtype]
    elt = torch.empty((), dtype=dt).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * elt
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    out.mkdir(parents=True, exist_ok=False)
    gen = torch.Generator().manual_seed(seed)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))] \
        if len(shards) > 1 else ["model.safetensors"]
    for file, members in zip(names, shards):
        w = ShardWriter(out / file, [(n, dt, shapes[n]) for n in members])
        for n in members:
            t = torch.ones(shapes[n]) if "norm" in n else torch.randn(shapes[n], generator=gen) * 0.02
            w.write(n, t.to(dt))
            del t
        w.close()
    if len(shards) > 1:
        total = sum((out / f).stat().st_size for f in names)
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: f for f, members in zip(names, shards) for n in members}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    cfg.save_pretrained(out)
    tok.save_pretrained(out)
    params = sum(math.prod(s) for s in shapes.values())
    info = {"layers": layers, "hidden": hidden, "intermediate": intermediate, "heads": heads,
            "kv_heads": kv_heads, "vocab": len(tok), "dtype": dtype, "parameters": params,
            "bytes": sum((out / f).stat().st_size for f in names), "shards": len(names)}
    (out / "random_llama.json").write_text(json.dumps(info, indent=2))
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    ap.add_argument("--shard-size", type=float, default=2.0, help="GiB per shard (as transformers shards)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer directory (default: SmolLM2's)")
    a = ap.parse_args()
    info = make(a.out, layers=a.layers, hidden=a.hidden, intermediate=a.intermediate, heads=a.heads,
                kv_heads=a.kv_heads, dtype=a.dtype, shard_bytes=int(a.shard_size * 2**30), seed=a.seed, tokenizer=a.tokenizer)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
