"""Streaming one-shot pruning (`pruning/stream.py`): the same masks and bit-identical weights as the in-memory
path, one block in memory at a time, the checkpoint's dtype and sharding kept, bad inputs refused up front."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import cli_error, cli_ok
from prunetune.errors import PrunetuneError
from prunetune.models.loading import load_model
from prunetune.pruning.api import prune
from prunetune.pruning.masks import MaskSet
from prunetune.pruning.stream import (ShardWriter, open_checkpoint, parse_bytes, prune_checkpoint, read_header,
                                      read_tensor)

IDS = torch.randint(0, 259, (6, 32), generator=torch.Generator().manual_seed(0))


def _tiny_dir(tmp: Path, *, layers: int = 3, dtype: torch.dtype = torch.float32, shard: str | None = "40KB") -> Path:
    """A random tiny Llama saved as safetensors, sharded (several shards) unless `shard` is None."""
    from transformers import AutoModelForCausalLM

    from prunetune.models.loading import tiny_config, tiny_tokenizer

    cfg = tiny_config("tiny-llama")
    cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    path = tmp / f"src-{layers}-{str(dtype)[6:]}-{shard}"
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    tiny_tokenizer("llama").save_pretrained(path)
    return path


def _weights(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        if f.name != "masks.safetensors":
            out.update(load_file(str(f)))
    return out


CASES = [
    ("wanda", {}),
    ("sparsegpt", {}),
    ("sparsegpt", {"pattern": "2:4"}),
    ("magnitude", {}),
    ("wanda", {"pattern": "2:4"}),
    ("sparsegpt", {"granularity": "row"}),
    ("wanda", {"granularity": "heads"}),
    ("magnitude", {"granularity": "neurons"}),
    ("wanda", {"granularity": "rows"}),
    ("admm", {"layer_sparsity": "owl", "refine": "dsnot"}),  # OWL's measuring pass streams too (issue 28)
    ("magnitude", {"layer_sparsity": "owl"}),
]


@pytest.mark.parametrize(("method", "kw"), CASES, ids=[f"{m}-{'-'.join(map(str, k.values())) or 'default'}"
                                                       for m, k in CASES])
def test_streamed_output_equals_in_memory_pruning(tmp_path, method, kw):
    src = _tiny_dir(tmp_path)
    assert len(open_checkpoint(src).shards) > 1  # the layout really is sharded
    model = load_model(str(src)).model
    masks = prune(model, method, 0.5, calib=IDS, **kw)
    out = tmp_path / "out"
    res = prune_checkpoint(src, out, method, 0.5, calib=IDS, **kw)

    # sharded like the input: same files, same tensor in the same shard
    assert sorted(p.name for p in out.glob("model*.safetensors")) == sorted(open_checkpoint(src).shards)
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == \
        json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    streamed, ref = _weights(out), model.state_dict()
    assert set(streamed) == set(_weights(src))
    for k, v in streamed.items():
        assert torch.equal(v, ref[k]), k  # bit-identical
    got = MaskSet.load(out)
    assert got.names() == masks.names() or sorted(got.names()) == sorted(masks.names())
    for k in masks.names():
        assert torch.equal(got[k], masks[k]), k
    zeros = sum(int((ref[f"{n}.weight"] == 0).sum()) for n in res["layers"])
    assert res["zeros"] == zeros
    # plain transformers loads it and computes what the pruned in-memory model computes
    reloaded = load_model(str(out)).model
    assert torch.equal(reloaded(IDS[:2]).logits, model(IDS[:2]).logits)


def test_streaming_keeps_earlier_zeros_like_the_in_memory_re_prune(tmp_path):
    """SparseGPT's re-prune rule: weights pruned before stay zero and count towards the new sparsity."""
    src = _tiny_dir(tmp_path)
    first = tmp_path / "first"
    prune_checkpoint(src, first, "magnitude", 0.3)
    before = MaskSet.load(first)
    model = load_model(str(first)).model
    masks = prune(model, "sparsegpt", 0.5, calib=IDS, previous=before)
    second = tmp_path / "second"
    prune_checkpoint(first, second, "sparsegpt", 0.5, calib=IDS, previous=before)
    streamed = _weights(second)
    for k, v in model.state_dict().items():
        assert torch.equal(streamed[k], v), k
    after = MaskSet.load(second)
    for k in masks.names():
        assert torch.equal(after[k], masks[k])
        assert not (after[k] & ~before[k]).any()  # nothing pruned before comes back


def test_bf16_checkpoint_stays_bf16_unless_asked(tmp_path):
    src = _tiny_dir(tmp_path, dtype=torch.bfloat16, shard=None)
    assert open_checkpoint(src).dtype() == torch.bfloat16
    res = prune_checkpoint(src, tmp_path / "auto", "wanda", 0.5, calib=IDS)
    assert res["dtype"] == {"checkpoint": "bfloat16", "compute_and_export": "bfloat16", "statistics": "float32"}
    auto = _weights(tmp_path / "auto")
    assert {v.dtype for v in auto.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["dtype"] == "bfloat16"
    # the same as the in-memory path at the same dtype
    model = load_model(str(src), dtype="auto").model
    assert next(model.parameters()).dtype == torch.bfloat16
    prune(model, "wanda", 0.5, calib=IDS)
    for k, v in model.state_dict().items():
        assert torch.equal(auto[k], v), k
    prune_checkpoint(src, tmp_path / "fp32", "wanda", 0.5, calib=IDS, dtype="fp32")
    assert {v.dtype for v in _weights(tmp_path / "fp32").values()} == {torch.float32}


def test_shard_writer_fills_slots_in_any_order_and_refuses_an_unfinished_file(tmp_path):
    a, b = torch.arange(6.0).reshape(2, 3), torch.ones(5, dtype=torch.bfloat16)
    w = ShardWriter(tmp_path / "x.safetensors", [("a", a.dtype, a.shape), ("b", b.dtype, b.shape)])
    w.write("b", b)
    w.write("a", a)
    w.close()
    got = load_file(str(tmp_path / "x.safetensors"))  # the safetensors package reads it
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)
    infos, _ = read_header(tmp_path / "x.safetensors")
    assert torch.equal(read_tensor(infos["b"]), b)
    w = ShardWriter(tmp_path / "y.safetensors", [("a", a.dtype, a.shape), ("b", b.dtype, b.shape)])
    w.write("a", a)
    with pytest.raises(PrunetuneError, match="1 tensors were never written"):
        w.close()


def test_parse_bytes():
    assert parse_bytes("16GB") == 16 * 2**30
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1000") == 1000
    with pytest.raises(PrunetuneError, match="not a size"):
        parse_bytes("lots")


# ------------------------------------------------------------------------------------------------ the CLI
def _cli(src: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", str(src), "--method", "wanda", "--calib", "wikitext2", "--nsamples", "4", "--seqlen", "32",
            "--out", str(out), *extra]


def test_cli_streams_when_the_model_does_not_fit_the_budget(tmp_path, capsys):
    src = _tiny_dir(tmp_path)
    out_s, out_m = tmp_path / "s", tmp_path / "m"
    from prunetune.pruning.stream import plan_memory

    plan = plan_memory(open_checkpoint(src), torch.float32, nsamples=4, seqlen=32, calib_batch=4, hessian=False)
    assert plan.streaming < plan.in_memory
    budget = (plan.streaming + plan.in_memory) // 2  # the whole model does not fit, one block does
    cli_ok(_cli(src, out_s, "--max-memory", str(budget)), capsys)
    cli_ok(_cli(src, out_m, "--no-stream"), capsys)
    man_s, man_m = (json.loads((o / "manifest.json").read_text()) for o in (out_s, out_m))
    proto = man_s["metrics"]["01-prune"]["prune_seconds"]["protocol"]
    assert proto["streamed"] is True and proto["dtype"]["compute_and_export"] == "float32"
    assert man_m["metrics"]["01-prune"]["prune_seconds"]["protocol"]["streamed"] is False
    exp_s, exp_m = man_s["metrics"]["02-export"], man_m["metrics"]["02-export"]
    for key in ("sparsity", "nonzero_parameters"):
        assert exp_s[key] == exp_m[key], key
    # the streamed export keeps the input's shards (a header each); the in-memory one writes one file
    assert exp_s["size_on_disk_mb"]["value"] == pytest.approx(exp_m["size_on_disk_mb"]["value"], rel=0.01)
    a, b = _weights(out_s / "model"), _weights(out_m / "model")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (out_s / "model" / "manifest.json").is_file() and (out_s / "report.md").is_file()
    from huggingface_hub import ModelCard

    card = ModelCard.load(out_s / "model" / "README.md")  # the export's model card, as in memory
    assert card.data.to_dict()["sparsity"] == pytest.approx(0.5)


def test_cli_streaming_bad_inputs_leave_nothing_behind(tmp_path, capsys):
    src = _tiny_dir(tmp_path)
    # a budget below one block says what one block needs
    line = cli_error(_cli(src, tmp_path / "o1", "--stream", "--max-memory", "1MB"), capsys, "one block")
    assert "GiB" in line and not (tmp_path / "o1").exists()
    # a .bin checkpoint needs the in-memory path
    binary = tmp_path / "bin"
    shutil.copytree(src, binary)
    for f in binary.glob("model*.safetensors*"):
        f.unlink()
    (binary / "pytorch_model.bin").write_bytes(b"\0" * 16)
    cli_error(_cli(binary, tmp_path / "o2", "--stream"), capsys, "--no-stream")
    assert not (tmp_path / "o2").exists()
    # a shard named in the index but missing
    holed = tmp_path / "holed"
    shutil.copytree(src, holed)
    victim = sorted(holed.glob("model-*.safetensors"))[1]
    victim.unlink()
    cli_error(_cli(holed, tmp_path / "o3", "--stream"), capsys, victim.name)
    # global ranks every layer at once
    cli_error(_cli(src, tmp_path / "o4", "--stream", "--granularity", "global"), capsys, "global")
    assert not (tmp_path / "o4").exists()
    # streaming cannot also evaluate the whole model
    cli_error(_cli(src, tmp_path / "o5", "--stream", "--eval-ppl", "wikitext2"), capsys, "--eval-ppl")
    # a bad dtype
    cli_error(_cli(src, tmp_path / "o6", "--dtype", "int3"), capsys, "dtype")


def test_cli_refuses_a_disk_without_room_before_starting(tmp_path, capsys, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    src = _tiny_dir(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda _p: usage(10**9, 10**9 - 1000, 1000))
    line = cli_error(_cli(src, tmp_path / "o", "--stream"), capsys, "not enough disk")
    assert "GiB needed" in line and not (tmp_path / "o").exists()


def test_prune_checkpoint_refuses_a_non_empty_output(tmp_path):
    src = _tiny_dir(tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with pytest.raises(PrunetuneError, match="not empty"):
        prune_checkpoint(src, tmp_path / "busy", "magnitude", 0.5)
    assert (tmp_path / "busy" / "x").read_text() == "keep me"


# ------------------------------------------------------------------------------------------ real model
@pytest.mark.slow
@pytest.mark.parametrize(("method", "pattern"), [("wanda", None), ("sparsegpt", None), ("sparsegpt", "2:4"),
                                                 ("magnitude", None)])
def test_smollm2_streamed_equals_in_memory(tmp_path, smollm2, method, pattern):
    """On the real SmolLM2 (30 blocks, GQA, tied embeddings): same masks, bit-identical weights."""
    import copy

    from prunetune.data.calibration import calibration_samples
    from prunetune.data.sources import load_text
    from prunetune.models.loading import local_hf_dir

    src = local_hf_dir("smollm2-135m")
    ids = calibration_samples(smollm2.tokenizer, load_text("wikitext2", "valid").text, 4, 128, 0, "wikitext2")
    model = copy.deepcopy(smollm2.model)
    masks = prune(model, method, 0.5, pattern=pattern, calib=ids)
    out = tmp_path / "out"
    prune_checkpoint(src, out, method, 0.5, pattern=pattern, calib=ids)
    streamed = _weights(out)
    for k, v in model.state_dict().items():
        if k in streamed:
            assert torch.equal(streamed[k], v), k
    assert set(streamed) == set(_weights(src))
    got = MaskSet.load(out)
    assert sorted(got.names()) == sorted(masks.names())
    for k in masks.names():
        assert torch.equal(got[k], masks[k]), k


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_streaming_on_cuda_onloads_one_block_and_matches_the_in_memory_cuda_path(tmp_path, method, monkeypatch):
    from prunetune.pruning import stream as st

    src = _tiny_dir(tmp_path, layers=4)
    model = load_model(str(src)).model
    masks = prune(model, method, 0.5, calib=IDS, device="cuda")
    assert next(model.parameters()).device.type == "cpu"
    on_gpu: set[int] = set()
    most = [0]
    load, release = st.StreamIO.load, st.StreamIO.release

    def counting_load(self, module):
        load(self, module)
        if any(p.is_cuda for p in module.parameters()):
            on_gpu.add(id(module))
            most[0] = max(most[0], len(on_gpu))

    def counting_release(self, module):
        release(self, module)
        on_gpu.discard(id(module))

    monkeypatch.setattr(st.StreamIO, "load", counting_load)
    monkeypatch.setattr(st.StreamIO, "release", counting_release)
    prune_checkpoint(src, tmp_path / "out", method, 0.5, calib=IDS, device="cuda")
    assert most[0] == 1 and not on_gpu  # one block on the GPU at a time, none left there
    streamed = _weights(tmp_path / "out")
    for k, v in model.state_dict().items():
        assert torch.equal(streamed[k], v), k
    got = MaskSet.load(tmp_path / "out")
    assert all(torch.equal(got[k], masks[k]) for k in masks.names())


def test_prunetune_prune_given_a_path_streams_into_out(tmp_path):
    import prunetune

    src = _tiny_dir(tmp_path)
    res = prunetune.prune(str(src), "magnitude", 0.5, out=tmp_path / "o")
    assert res["sparsity"] == 0.5 and set(res["layers"]) == set(MaskSet.load(tmp_path / "o").names())
    with pytest.raises(PrunetuneError, match="out="):
        prunetune.prune(str(src), "magnitude", 0.5)
    model = load_model(str(src)).model  # a model still prunes in memory and returns its masks
    assert isinstance(prunetune.prune(model, "magnitude", 0.5), MaskSet)
