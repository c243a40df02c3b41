"""Cost of a model: size on disk, parameters, non-zeros, forward latency and generation speed.

Timings are medians over `repeats` runs after `warmup` runs (the first calls pay for allocation and
kernel selection); inputs are seeded random token ids, so the number depends only on shapes, threads and
dtype, which are recorded with it. Unstructured zeros do not make a dense CPU matmul faster: compare the
non-zero count for sparsity and the latency for speed, never one for the other.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from prunetune.errors import PrunetuneError
from prunetune.models.arch import nonzero_count, parameter_count, unwrap


def size_on_disk(path: str | Path) -> dict:
    """Bytes of the weights of a model directory (`*.safetensors`, else `*.bin`/`*.gguf`), or of one file."""
    p = Path(path)
    if p.is_file():
        return {"bytes": p.stat().st_size, "files": 1, "format": p.suffix.lstrip(".")}
    if not p.is_dir():
        raise PrunetuneError(f"{p} is neither a model directory nor a weights file")
    for fmt in ("safetensors", "bin", "gguf"):
        files = sorted(p.glob(f"*.{fmt}"))
        if files:
            return {"bytes": sum(f.stat().st_size for f in files), "files": len(files), "format": fmt}
    raise PrunetuneError(f"{p} holds no weight files (*.safetensors, *.bin, *.gguf)")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the unique parameters occupy in memory (tied weights once)."""
    seen: set[int] = set()
    total = 0
    for prm in model.parameters():
        if id(prm) not in seen:
            seen.add(id(prm))
            total += prm.numel() * prm.element_size()
    return total


def _dummy_inputs(model, batch: int, seqlen: int, seed: int = 0) -> dict:
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise PrunetuneError("the model config has no vocab_size: cannot build timing inputs")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seqlen), generator=gen).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(model.config, "is_encoder_decoder", False):
        start = getattr(model.config, "decoder_start_token_id", 0) or 0
        inputs["decoder_input_ids"] = torch.full((batch, seqlen), start, dtype=torch.long, device=device)
    return inputs


def _median_ms(fn, warmup: int, repeats: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times), times


@torch.no_grad()
def forward_latency(model, batch: int = 1, seqlen: int = 128, warmup: int = 1, repeats: int = 5) -> dict:
    """Median milliseconds of one forward pass at `batch` x `seqlen` tokens."""
    if batch < 1 or seqlen < 1 or repeats < 1 or warmup < 0:
        raise PrunetuneError(f"bad timing setup: batch={batch} seqlen={seqlen} repeats={repeats} warmup={warmup}")
    inputs = _dummy_inputs(model, batch, seqlen)
    model.eval()
    med, times = _median_ms(lambda: model(**inputs), warmup, repeats)
    return {"batch": batch, "seqlen": seqlen, "ms_median": med, "ms_all": times,
            "tokens_per_s": batch * seqlen / (med / 1000.0)}


@torch.no_grad()
def generate_speed(model, tokenizer=None, new_tokens: int = 32, prompt_len: int = 16, warmup: int = 1,
                   repeats: int = 3) -> dict:
    """Greedy generation of exactly `new_tokens` tokens (EOS ignored) after a seeded random prompt; tokens/s."""
    if getattr(model.config, "is_encoder_decoder", False) or not hasattr(model, "generate"):
        raise PrunetuneError("generation speed is measured for causal LMs only")
    if new_tokens < 1 or prompt_len < 1:
        raise PrunetuneError(f"new_tokens and prompt_len must be >= 1, got {new_tokens} and {prompt_len}")
    inputs = _dummy_inputs(model, 1, prompt_len, seed=1)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None) or getattr(model.config, "eos_token_id", None) or 0
    produced: list[int] = []

    def run() -> None:
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=pad)
        produced.append(out.shape[1] - prompt_len)

    model.eval()
    med, times = _median_ms(run, warmup, repeats)
    n = produced[-1]
    return {"new_tokens": n, "prompt_len": prompt_len, "ms_median": med, "tokens_per_s": n / (med / 1000.0),
            "ms_all": times}


def _is_causal(model) -> bool:
    return "ForCausalLM" in unwrap(model).__class__.__name__


def speed_report(model, tokenizer=None, model_dir: str | Path | None = None, *, seqlen: int = 128,
                 batch_size: int = 8, warmup: int = 1, repeats: int = 5, gen_tokens: int = 32) -> dict:
    """Everything `prunetune eval --speed` shows: sizes, counts, latency at batch 1 and N, generate tokens/s."""
    t0 = time.perf_counter()
    out: dict = {
        "metric": "speed",
        "parameters": parameter_count(model),
        "nonzero_parameters": nonzero_count(model),
        "weight_bytes_in_memory": weight_bytes(model),
        "size_on_disk": size_on_disk(model_dir) if model_dir is not None else None,
        "latency": [forward_latency(model, b, seqlen, warmup, repeats) for b in dict.fromkeys((1, batch_size))],
        "generate": None,
    }
    if _is_causal(model):
        out["generate"] = generate_speed(model, tokenizer, gen_tokens, warmup=warmup, repeats=max(1, repeats // 2))
    out["seconds"] = time.perf_counter() - t0
    out["protocol"] = {
        "threads": torch.get_num_threads(),
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "seqlen": seqlen,
        "batch_sizes": list(dict.fromkeys((1, batch_size))),
        "warmup": warmup,
        "repeats": repeats,
        "statistic": "median wall-clock ms per call; seeded random token ids",
        "generate": f"greedy, exactly {gen_tokens} new tokens after a 16-token prompt, KV cache on",
    }
    return out
