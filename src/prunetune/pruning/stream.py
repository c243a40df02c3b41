"""Prune a checkpoint larger than memory: one decoder block in memory at a time, read from and written to disk.

The in-memory path loads the whole model, so its peak grows with the model (about 1.3x the weights). Here
the model is a skeleton whose parameters live on the meta device (accelerate's `init_empty_weights`; the
rotary buffers are real because they are computed, not stored). Block 0's inputs need only the embedding
rows of the calibration tokens, so only those rows are read (`RowsEmbedding`); then the calibration engine
(`calibrate.sequential`) walks the blocks as it always does, with two callbacks: before a block's turn its
weights are read from the safetensors shards onto the compute device, and once the block's pruned outputs
have become the next block's inputs its weights and masks are written to the output shards and the block
goes back to the meta device. The embedding table, the final norm and the LM head are copied from file to
file in row chunks.

So the peak is one block (weights, the criterion's statistics) + the calibration activations, whatever the
number of blocks and the size of the vocabulary. The criteria, granularities, N:M patterns and SparseGPT's
re-prune rule are the engine's own (`api.prune` with `io=`), so a streamed model has the same masks and
bit-identical weights as the in-memory path (tested on SmolLM2).

The shards are read and written by offset rather than through `safetensors.safe_open`, which maps a whole
shard: an output shard's header is known before any block is pruned (same tensors, shapes and dtypes as the
input), so it is written first and each block's tensors are written into their slots when the block is done.
The files are ordinary safetensors (the `safetensors` package and `transformers` read them).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prunetune.errors import PrunetuneError
from prunetune.models.arch import get_adapter
from prunetune.models.loading import resolve_dtype
from prunetune.pruning.api import masked_layers, prune as prune_in_memory, resolve_granularity, select_targets, validate
from prunetune.pruning.calibrate import calibration_ids, release_freed_memory
from prunetune.pruning.masks import MASKS_FILE, MaskSet, PackedMask, packed_masks_header

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GB = 1024**3

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


# ------------------------------------------------------------------------------------- safetensors by offset
@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are in a shard."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """The tensors of one safetensors file (name -> where) and its `__metadata__`."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 * 2**20:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        raise PrunetuneError(f"{path} is not a readable safetensors file: {exc}") from None
    meta = header.pop("__metadata__", None) or {}
    out = {}
    for name, h in header.items():
        if h["dtype"] not in _ST_DTYPES:
            raise PrunetuneError(f"{path}: tensor '{name}' has dtype {h['dtype']}, which prunetune cannot stream")
        b, e = h["data_offsets"]
        out[name] = TensorInfo(path, _ST_DTYPES[h["dtype"]], tuple(h["shape"]), 8 + n + b, e - b)
    return out, meta


def _read_into(f, buf: torch.Tensor, start: int, file: Path) -> None:
    f.seek(start)
    view = memoryview(buf.numpy())
    got = 0
    while got < len(view):
        k = f.readinto(view[got:])
        if not k:
            raise PrunetuneError(f"{file} is truncated (a tensor ends past the end of the file)")
        got += k


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor read into fresh memory (no mapping of the shard survives the call)."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    with open(info.file, "rb", buffering=0) as f:
        _read_into(f, buf, info.start, info.file)
    return buf.view(info.dtype).reshape(info.shape)


def _row_bytes(info: TensorInfo) -> int:
    return info.nbytes // info.shape[0] if info.shape and info.shape[0] else info.nbytes


def read_rows(info: TensorInfo, rows: torch.Tensor) -> torch.Tensor:
    """Some rows of a 2-D tensor (an embedding table's calibration tokens), read one by one from the file."""
    rb = _row_bytes(info)
    out = torch.empty(len(rows), rb, dtype=torch.uint8)
    with open(info.file, "rb", buffering=0) as f:
        for i, r in enumerate(rows.tolist()):
            _read_into(f, out[i], info.start + r * rb, info.file)
    return out.view(info.dtype).reshape(len(rows), *info.shape[1:])


def iter_row_chunks(info: TensorInfo, chunk_bytes: int = 64 * 2**20):
    """(first row, rows) of a tensor in chunks of about `chunk_bytes`: an embedding table or LM head is copied
    without ever being whole in memory."""
    rb = _row_bytes(info)
    n = info.shape[0] if info.shape else 1
    step = max(1, chunk_bytes // max(rb, 1))
    with open(info.file, "rb", buffering=0) as f:
        for r0 in range(0, n, step):
            k = min(step, n - r0)
            buf = torch.empty(k * rb, dtype=torch.uint8)
            _read_into(f, buf, info.start + r0 * rb, info.file)
            yield r0, buf.view(info.dtype).reshape(k, *info.shape[1:]) if info.shape else buf.view(info.dtype)


class ShardWriter:
    """A safetensors file whose header is written first and whose tensors are filled in any order.

    `tensors` gives every tensor's name, dtype and shape up front; `write(name, t)` puts one tensor in its
    slot. `close()` checks that every slot was written, so a half-filled shard is never taken as complete.
    """

    def __init__(self, path: Path, tensors: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        self.slots: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        offset = 0
        for name, dtype, shape in tensors:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.slots[name] = (offset, nbytes, dtype, tuple(shape))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * ((-len(blob)) % 8)
        self.base = 8 + len(blob)
        self.path = path
        self.pending = set(self.slots)
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(blob)) + blob)
        self.f.truncate(self.base + offset)

    def write(self, name: str, tensor: torch.Tensor, first_row: int = 0) -> None:
        """Write `tensor` into its slot, or rows `first_row...` of it (the slot counts as written with its
        last row)."""
        offset, nbytes, dtype, shape = self.slots[name]
        t = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        rows, k = (shape[0] if shape else 1), (t.shape[0] if t.dim() else 1)
        if t.dim() != len(shape) or tuple(t.shape[1:]) != tuple(shape[1:]) or first_row + k > rows:
            raise PrunetuneError(f"{name}: shape {tuple(t.shape)} does not match the checkpoint's {shape}")
        self.f.seek(self.base + offset + first_row * (nbytes // rows if rows else 0))
        self.f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        if first_row + k == rows:
            self.pending.discard(name)

    def close(self) -> None:
        if self.pending:
            raise PrunetuneError(f"{self.path.name}: {len(self.pending)} tensors were never written "
                                 f"(e.g. {sorted(self.pending)[0]})")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.pending = set()


# ------------------------------------------------------------------------------------------ the checkpoint
@dataclass
class Checkpoint:
    """A local HF directory's safetensors: which shard holds each tensor, and their sizes."""

    path: Path
    shards: list[str]  # file names, in the index's order
    tensors: dict[str, TensorInfo]
    config: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def dtype(self) -> torch.dtype:
        """The dtype most of the weight bytes are stored in (what `--dtype auto` keeps)."""
        by: dict[torch.dtype, int] = {}
        for t in self.tensors.values():
            if t.dtype.is_floating_point:
                by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
        return max(by, key=by.get) if by else torch.float32


def open_checkpoint(path: Path | str) -> Checkpoint:
    """Read the shard layout of `path`, refusing what streaming cannot read (one line each)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise PrunetuneError(f"streaming needs a local Hugging Face directory with config.json; {path} has none")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise PrunetuneError(f"{index} is not a safetensors index: {exc}") from None
        shards = list(dict.fromkeys(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise PrunetuneError(f"shard {missing[0]} named in {INDEX_FILE} is missing from {path}"
                                 + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    elif (path / WEIGHTS_FILE).is_file():
        shards, weight_map = [WEIGHTS_FILE], None
    else:
        bins = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        what = f"its weights are {bins[0]} (pickle)" if bins else "it holds no model.safetensors"
        raise PrunetuneError(f"streaming reads safetensors only and {what}: prune it in memory with --no-stream, "
                             "or convert it to safetensors first")
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        infos, _ = read_header(path / shard)
        for name, info in infos.items():
            if weight_map is not None and weight_map.get(name) != shard:
                continue
            tensors[name] = info
    if weight_map is not None:
        absent = [n for n in weight_map if n not in tensors]
        if absent:
            raise PrunetuneError(f"tensor '{absent[0]}' is listed in {INDEX_FILE} but not found in "
                                 f"{weight_map[absent[0]]}")
    return Checkpoint(path, shards, tensors, json.loads((path / "config.json").read_text()))


# ------------------------------------------------------------------------------------------ memory budget
def parse_bytes(text: str) -> int:
    """'12GB', '512MiB', '1.5T', '2000000000' -> bytes (binary units: a GB here is 2**30, as `free -g`)."""
    s = str(text).strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        if s and s[-1] in units:
            value = float(s[:-1]) * units[s[-1]]
        else:
            value = float(s)
    except ValueError:
        raise PrunetuneError(f"--max-memory '{text}' is not a size; write it like 12GB or 512MB") from None
    if value <= 0:
        raise PrunetuneError(f"--max-memory must be positive, got '{text}'")
    return int(value)


def available_memory() -> int:
    """What the machine has free now (psutil's `available`: free + reclaimable cache)."""
    import psutil

    return int(psutil.virtual_memory().available)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes each path needs, from the checkpoint's shapes (the formulas of README's "Large models")."""

    in_memory: int  # whole model at the compute dtype + masks + one block's working set
    streaming: int  # embedding + one block + the criterion's statistics + activations
    block: int  # one block at the compute dtype plus its statistics: what a budget must at least hold


BASELINE_BYTES = int(0.6 * GB)  # interpreter, torch, transformers, tokenizer and calibration text (0.57-0.62 GiB measured)


def plan_memory(ckpt: Checkpoint, compute_dtype: torch.dtype, *, nsamples: int, seqlen: int, calib_batch: int,
                hessian: bool) -> MemoryPlan:
    """The peaks of the two paths, from the checkpoint alone (nothing is loaded)."""
    cfg = ckpt.config
    hidden = int(cfg.get("hidden_size", 0) or 0)
    inter = int(cfg.get("intermediate_size", 4 * hidden) or 4 * hidden)
    elt = torch.empty((), dtype=compute_dtype).element_size()
    layers = _block_tensors(ckpt)
    if not layers:
        raise PrunetuneError(f"no decoder blocks ('model.layers.N.') found in {ckpt.path}: streaming supports "
                             "decoder-only causal LMs of the Llama family (Llama, Mistral, Qwen2, Qwen3)")
    block_elems = max(sum(math.prod(ckpt.tensors[n].shape) for n in names) for names in layers.values())
    # statistics: Wanda keeps a vector per layer; SparseGPT one in x in Hessian per layer (the largest input
    # is the MLP's down projection) plus a float32 copy of the layer being updated
    stats = 4 * (hidden * hidden * 4 + inter * inter + 2 * hidden * inter) if hessian else 4 * (6 * hidden + inter)
    # selecting one layer's mask: its float32 scores, then a row sort's values and int64 indices (16 bytes a
    # weight of the largest layer: 1.1 GB for a 5120 x 13824 projection, the bulk of a 13B model's peak)
    largest = max(math.prod(ckpt.tensors[n].shape) for names in layers.values() for n in names)
    block = block_elems * elt + stats + 16 * largest
    acts = nsamples * seqlen * hidden * elt  # every window's hidden state, replaced in place block by block
    work = calib_batch * seqlen * (3 * inter + 6 * hidden) * max(elt, 4)  # one batch through one block
    embed = nsamples * seqlen * hidden * elt  # at most one embedding row per calibration token
    n_elems = sum(math.prod(t.shape) for t in ckpt.tensors.values())
    in_memory = int(1.35 * n_elems * elt) + acts + work + stats + BASELINE_BYTES
    streaming = embed + block + acts + work + BASELINE_BYTES
    return MemoryPlan(in_memory, streaming, block + acts + work)


def _block_tensors(ckpt: Checkpoint) -> dict[int, list[str]]:
    """Checkpoint tensor names per decoder block index (`*.layers.N.*`)."""
    import re

    rx = re.compile(r"(?:^|\.)layers\.(\d+)\.")
    out: dict[int, list[str]] = {}
    for name in ckpt.tensors:
        m = rx.search(name)
        if m:
            out.setdefault(int(m.group(1)), []).append(name)
    return out


def decide(ckpt: Checkpoint, stream: bool | None, max_memory: int | None, plan: MemoryPlan) -> bool:
    """Stream when asked, or when the in-memory path would not fit the budget; refuse a budget below a block."""
    budget = max_memory if max_memory is not None else available_memory()
    use = stream if stream is not None else plan.in_memory > budget
    if use and plan.streaming > budget:
        raise PrunetuneError(f"--max-memory {budget / GB:.2f} GiB is less than streaming needs: "
                             f"{plan.streaming / GB:.2f} GiB (one block with its statistics and activations "
                             f"{plan.block / GB:.2f} GiB, plus the embedding table and 0.5 GiB of libraries)")
    return use


def output_bytes(ckpt: Checkpoint, dtype: str) -> int:
    """What the pruned copy takes on disk: the weights at the export dtype plus one mask bit per weight."""
    out_elt = torch.empty((), dtype=resolve_dtype(dtype, ckpt.dtype())).element_size()
    total = 0
    for t in ckpt.tensors.values():
        n = math.prod(t.shape)
        total += n * out_elt if t.dtype.is_floating_point else t.nbytes
        total += n // 8
    return total


def check_disk(out: Path, need: int) -> None:
    """Refuse before any work when the output's file system cannot hold the pruned copy."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise PrunetuneError(f"not enough disk for the output: {need / GB:.2f} GiB needed at {out}, "
                             f"{free / GB:.2f} GiB free")


# ------------------------------------------------------------------------------------------ block I/O
class StreamIO:
    """The calibration engine's block callbacks: read a block before its turn, write and drop it after."""

    def __init__(self, ckpt: Checkpoint, model: torch.nn.Module, out: Path, compute_dtype: torch.dtype,
                 out_dtype: torch.dtype, device: torch.device | str | None, masked: Iterable[str]) -> None:
        self.ckpt, self.model, self.out = ckpt, model, out
        self.compute_dtype, self.out_dtype = compute_dtype, out_dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.names = {id(m): n for n, m in model.named_modules()}
        self.writers: dict[str, ShardWriter] = {}
        self.shard_of: dict[str, str] = {}
        self.written = 0
        self.layer_sparsity: dict[str, dict] = {}
        self.zeros = self.numel = 0

        self.masked = list(masked)
        # real zeros are counted over every prunable linear, as `sparsity_report` counts them
        self.linears = {n: role for n, (role, _lin) in get_adapter(model).linears().items()}
        self.pruned = MaskSet()  # filled by `api.prune`; each block's masks leave it when the block is written
        self._open_writers()

    def _cast(self, dtype: torch.dtype) -> torch.dtype:
        return self.out_dtype if dtype.is_floating_point else dtype

    def _open_writers(self) -> None:
        by_shard: dict[str, list[tuple[str, TensorInfo]]] = {}
        for name, info in self.ckpt.tensors.items():
            by_shard.setdefault(info.file.name, []).append((name, info))
        for shard in self.ckpt.shards:
            items = sorted(by_shard.get(shard, []), key=lambda kv: kv[1].start)
            self.writers[shard] = ShardWriter(self.out / shard,
                                              [(n, self._cast(i.dtype), i.shape) for n, i in items])
            for n, _ in items:
                self.shard_of[n] = shard
        shapes = {n: self.ckpt.tensors[n + ".weight"].shape for n in self.masked}
        self.masks = ShardWriter(self.out / MASKS_FILE, packed_masks_header(shapes),
                                 metadata=MaskSet.file_metadata(packed=True, shapes=shapes))

    def _prefix(self, module: torch.nn.Module) -> str:
        name = self.names[id(module)]
        return f"{name}." if name else ""

    def load(self, module: torch.nn.Module) -> None:
        """Materialise `module`'s parameters and buffers from the checkpoint on the compute device."""
        prefix = self._prefix(module)
        state = {}
        for key, _t in list(module.state_dict(keep_vars=True).items()):
            full = prefix + key
            info = self.ckpt.tensors.get(full)
            if info is None:
                raise PrunetuneError(f"'{full}' is not in the checkpoint {self.ckpt.path}: its tensor names do "
                                     "not match the model's")
            t = read_tensor(info)
            state[key] = t.to(device=self.device, dtype=self.compute_dtype if t.is_floating_point() else t.dtype)
        module.load_state_dict(state, assign=True, strict=True)

    def release(self, module: torch.nn.Module) -> None:
        """Write `module`'s (pruned) tensors and its layers' masks, count zeros, and drop the weights."""
        masks = self.pruned
        prefix = self._prefix(module)
        for key, t in module.state_dict().items():
            full = prefix + key
            self.writers[self.shard_of[full]].write(full, t)
            if full.endswith(".weight") and full[: -len(".weight")] in self.linears:
                layer = full[: -len(".weight")]
                z = int(t.numel() - torch.count_nonzero(t))
                self.layer_sparsity[layer] = {"role": self.linears[layer], "sparsity": z / t.numel()}
                self.zeros += z
                self.numel += t.numel()
        for name in [n for n in masks.names() if n.startswith(prefix)]:
            raw = masks.masks.raw(name)
            packed = raw if isinstance(raw, PackedMask) else PackedMask(raw)
            self.masks.write(name, packed.bits)
            del masks.masks[name]
        module.to("meta")

        release_freed_memory()

    def copy_rest(self) -> None:
        """Tensors outside the blocks (embedding table, final norm, LM head), file to file in row chunks."""
        for name, info in self.ckpt.tensors.items():
            writer = self.writers[self.shard_of[name]]
            if name in writer.pending:
                for r0, chunk in iter_row_chunks(info):
                    writer.write(name, chunk, first_row=r0)

    def close(self) -> None:
        """Check and sync every output file (a shard with an unwritten slot is an error, never complete)."""
        for w in [*self.writers.values(), self.masks]:
            w.close()

    def abort(self) -> None:
        """Close what is still open (after an error the stage's temp directory is thrown away)."""
        for w in [*self.writers.values(), self.masks]:
            if not w.f.closed:
                w.f.close()


# ------------------------------------------------------------------------------------------ the command
def skeleton(ckpt: Checkpoint, dtype: torch.dtype):
    """The model with every parameter on the meta device and its computed buffers (rotary) real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ckpt.path)
    if getattr(config, "is_encoder_decoder", False):
        raise PrunetuneError("streaming supports decoder-only causal LMs; an encoder-decoder model prunes in memory")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model


@torch.no_grad()
def prune_checkpoint(path: Path | str, out: Path | str, method: str = "wanda", sparsity: float = 0.5, *,
                     dtype: str = "auto", device: str | None = None, calib=None, tokenizer=None,
                     nsamples: int = 32, seqlen: int = 512, seed: int = 0, batch_size: int = 1,
                     pattern: str | None = None, granularity: str | None = None, skip: list[str] | None = None,
                     previous: MaskSet | None = None, progress: bool | None = None, **extras) -> dict:
    """Prune the checkpoint at `path` block by block into the directory `out` (created; must not exist).

    Same arguments as `api.prune` plus `dtype` (auto keeps the checkpoint's; fp32 | bf16 | fp16), with the
    model read from and written to disk. Returns the per-layer real zeros and the dtypes used. `extras`:
    `api.prune`'s layer_sparsity, owl_lambda, owl_m, refine and options (OWL's measuring pass streams too).
    """
    ckpt = open_checkpoint(path)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise PrunetuneError(f"{out} is not empty: streaming writes a new directory")
    compute = resolve_dtype(dtype, ckpt.dtype())
    model = skeleton(ckpt, compute)
    if tokenizer is None and not isinstance(calib, torch.Tensor) and calib is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(ckpt.path)

    validate(method, sparsity, pattern, granularity, **extras)
    masked = masked_layers(model, select_targets(model, skip), resolve_granularity(method, granularity, pattern))
    out.mkdir(parents=True, exist_ok=True)
    io = StreamIO(ckpt, model, out, compute, compute, device, masked)
    try:
        if calib is not None:  # block 0's inputs need the embedding rows of the calibration tokens only
            calib = calibration_ids(calib, tokenizer, nsamples, seqlen, seed)
            _calibration_embedding(model, ckpt, calib, compute)
        release_freed_memory()  # what tokenising the calibration text left on the heap, before any block
        masks = prune_in_memory(model, method, sparsity, pattern=pattern, granularity=granularity, calib=calib,
                                tokenizer=tokenizer, nsamples=nsamples, seqlen=seqlen, skip=skip, device=device,
                                seed=seed, progress=progress, batch_size=batch_size, previous=previous, io=io,
                                masks=io.pruned, **extras)
        if len(masks):
            raise PrunetuneError(f"internal: {len(masks)} masks were never written (e.g. {masks.names()[0]})")
        io.copy_rest()
        io.close()
    finally:
        io.abort()
    _write_side_files(ckpt, out, compute)
    return {"layers": io.layer_sparsity, "zeros": io.zeros, "numel": io.numel,
            "sparsity": io.zeros / io.numel if io.numel else 0.0,
            "dtype": {"checkpoint": _dtype_name(ckpt.dtype()), "compute_and_export": _dtype_name(compute),
                      "statistics": "float32"}}


class RowsEmbedding(torch.nn.Module):
    """An embedding table that holds only the rows of the tokens it will see (calibration): block 0's inputs
    without the whole table in memory (128k x 8192 floats is 4 GiB for a 70B model). Same lookup, same values."""

    def __init__(self, rows: torch.Tensor, ids: torch.Tensor, num_embeddings: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(rows, requires_grad=False)
        index = torch.full((num_embeddings,), -1, dtype=torch.long)
        index[ids] = torch.arange(len(ids))
        self.register_buffer("index", index, persistent=False)
        self.num_embeddings = num_embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(self.index.to(input_ids.device)[input_ids], self.weight)


def _calibration_embedding(model: torch.nn.Module, ckpt: Checkpoint, ids: torch.Tensor, dtype: torch.dtype) -> None:
    """Give the skeleton an input embedding holding the calibration tokens' rows (read from the checkpoint)."""
    embed = model.get_input_embeddings()
    name = {id(m): n for n, m in model.named_modules()}[id(embed)] + ".weight"
    info = ckpt.tensors.get(name)
    if info is None:
        raise PrunetuneError(f"'{name}' is not in the checkpoint {ckpt.path}: its tensor names do not match the model's")
    vocab = info.shape[0]
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise PrunetuneError(f"calibration token ids fall outside the model's vocabulary of {vocab}")
    used = torch.unique(ids)
    model.set_input_embeddings(RowsEmbedding(read_rows(info, used).to(dtype), used, vocab))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


SKIPPED_SIDE_FILES = (INDEX_FILE, MASKS_FILE, "manifest.json", "README.md")


def _write_side_files(ckpt: Checkpoint, out: Path, dtype: torch.dtype) -> None:
    """Config (with the export dtype), tokenizer and generation files beside the new shards."""
    for p in ckpt.path.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name not in SKIPPED_SIDE_FILES \
                and not p.name.endswith((".bin", ".pt", ".gguf")):
            shutil.copy2(p, out / p.name)
    cfg = dict(ckpt.config)
    cfg["dtype"] = _dtype_name(dtype)
    cfg.pop("torch_dtype", None)
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if len(ckpt.shards) > 1 or (ckpt.path / INDEX_FILE).is_file():
        size = sum(os.path.getsize(out / s) for s in ckpt.shards)
        index = {"metadata": {"total_size": size},
                 "weight_map": {n: i.file.name for n, i in sorted(ckpt.tensors.items())}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def prune(model: torch.nn.Module | str | Path, method: str = "wanda", sparsity: float = 0.5, *,
          out: str | Path | None = None, dtype: str = "auto", **kw):
    """`prunetune.prune`: an in-memory model is pruned in place (`api.prune`, returns its MaskSet); a path (a
    local HF directory of safetensors) is pruned by streaming into the new directory `out` in `dtype` and
    returns `prune_checkpoint`'s summary (real zeros per layer, dtypes), not a MaskSet, which would hold a
    bit per weight of a model that need not fit in memory (the masks are in `out/masks.safetensors`)."""
    if not isinstance(model, (str, Path)):
        return prune_in_memory(model, method, sparsity, **kw)
    if out is None:
        raise PrunetuneError("pruning a checkpoint on disk writes a new directory: pass out=...")
    return prune_checkpoint(model, out, method, sparsity, dtype=dtype, **kw)
