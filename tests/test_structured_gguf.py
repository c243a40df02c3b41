"""A shrunk model converts to GGUF with llama.cpp's own converter, unchanged.

The converter (`convert_hf_to_gguf.py` with its `conversion/` package and bundled `gguf-py`) ships in the
`llama-cpp-python` source package. The test fetches it once with `pip download` (PyPI) and caches the three
pieces under prunetune's cache dir; it skips, saying why, only when the download is impossible. The tiny
model carries SmolLM2's tokenizer: the converter refuses BPE pre-tokenizers it does not know.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch

LLAMA_CPP_PYTHON = "0.3.36"  # pinned: the converter's code moves with llama.cpp
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def llama_cpp_converter() -> Path:
    """Path to convert_hf_to_gguf.py, fetched from the llama-cpp-python sdist once and cached."""
    from prunetune.models.loading import cache_dir

    root = cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    script = root / "convert_hf_to_gguf.py"
    if script.is_file() and (root / "conversion").is_dir() and (root / "gguf-py").is_dir():
        return script
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if r.returncode != 0 or not sdists:
            pytest.skip(f"cannot obtain llama.cpp's converter: `pip download llama-cpp-python=={LLAMA_CPP_PYTHON}` "
                        f"failed ({(r.stderr or r.stdout).strip().splitlines()[-1:] or 'no sdist'})")
        prefix = f"{sdists[0].name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        staging = root.with_name(root.name + f".tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and any(m.name[len(prefix):].startswith(p) for p in CONVERTER_PARTS)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(staging, members=members, filter="data")
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    return script


@pytest.mark.slow
def test_shrunk_llama_converts_to_gguf_with_llama_cpp(tmp_path):
    from gguf import GGUFReader
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from prunetune.models.loading import gguf_to_hf_dir, smollm2_gguf_path
    from prunetune.pruning.shrink.surgery import shrink
    from prunetune.pruning.shrink.widths import keep_from_scores

    converter = llama_cpp_converter()
    tok = AutoTokenizer.from_pretrained(gguf_to_hf_dir(smollm2_gguf_path()))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
                      attention_bias=True)  # biases must survive surgery and conversion too
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    plan = keep_from_scores(model, {"heads": torch.rand(2, 2, generator=g), "neurons": torch.rand(2, 256, generator=g),
                                    "hidden": torch.rand(128, generator=g)},
                            sparsity={"heads": 0.5, "neurons": 0.5, "hidden": 0.5})
    shrink(model, plan)
    src = tmp_path / "shrunk"
    model.save_pretrained(src)
    tok.save_pretrained(src)

    out = tmp_path / "shrunk-f32.gguf"
    r = subprocess.run([sys.executable, str(converter), str(src), "--outfile", str(out), "--outtype", "f32"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]

    reader = GGUFReader(out)

    def field(key: str):
        f = reader.fields[key]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]][0]

    assert field("general.architecture") == "llama"
    assert int(field("llama.attention.head_count")) == 2  # 1 KV group x 2 query heads
    assert int(field("llama.attention.head_count_kv")) == 1
    assert int(field("llama.attention.key_length")) == 32  # head_dim 128 / 4 kept while hidden shrank to 64
    assert int(field("llama.embedding_length")) == 64
    assert int(field("llama.feed_forward_length")) == 128
    assert int(field("llama.block_count")) == 2
    assert field("tokenizer.ggml.pre") == "smollm"
    tensors = {t.name: t for t in reader.tensors}
    shapes = {n: tuple(int(x) for x in t.shape) for n, t in tensors.items()}  # GGUF order: (in, out)
    for b in range(2):
        assert shapes[f"blk.{b}.attn_q.weight"] == (64, 64)  # 2 query heads x 32
        assert shapes[f"blk.{b}.attn_k.weight"] == (64, 32)
        assert shapes[f"blk.{b}.attn_v.weight"] == (64, 32)
        assert shapes[f"blk.{b}.attn_q.bias"] == (64,)
        assert shapes[f"blk.{b}.attn_output.weight"] == (64, 64)
        assert shapes[f"blk.{b}.ffn_gate.weight"] == (64, 128)
        assert shapes[f"blk.{b}.ffn_down.weight"] == (128, 64)
        assert shapes[f"blk.{b}.attn_norm.weight"] == (64,)
    assert shapes["token_embd.weight"] == (64, len(tok))
    # values travel unchanged (f32): the MLP output projection and the rescaled norm gain of block 1
    layer = model.model.layers[1]
    down = torch.from_numpy(tensors["blk.1.ffn_down.weight"].data.copy()).reshape(64, 128)
    assert torch.equal(down, layer.mlp.down_proj.weight.detach())
    norm = torch.from_numpy(tensors["blk.1.ffn_norm.weight"].data.copy())
    assert torch.equal(norm, layer.post_attention_layernorm.weight.detach())
