"""Sequential layer-wise calibration: the lifecycle around the criteria, kept apart from their math.

The engine never runs the whole model on calibration data more than once. It captures what block 0
receives (hidden states plus whatever keyword arguments the family passes: rotary position embeddings and
position ids for Llama, the extended attention mask for BERT), then walks the blocks:

1. forward hooks on the block's linear layers feed a statistics object per layer (column norms for Wanda,
   the Hessian XᵀX for SparseGPT) while the block runs on all calibration batches;
2. the caller prunes the block's layers from those statistics (`on_block`);
3. the block runs again and its *pruned* outputs become the next block's inputs, so each block is pruned
   knowing the error of the blocks before it (as in the SparseGPT and Wanda reference code).

Only one block's activations live in memory at a time. With `device="cuda"` the model stays where it is
(CPU) and one block at a time is moved to the device with the activations, so a model larger than the GPU
can still be calibrated on it.

Encoder-decoder models (T5) have two stacks that talk through cross-attention; for them, and for global
thresholds that need every layer's scores before any pruning, `collect_all` gathers statistics for all
layers in one pass over the dense model instead.

What it runs on comes first: `calibration_ids` turns the calibration argument (token ids, a `TextSource` or a
source name) into token windows, for `prune`, the streaming pruner, the structured scores and PAYT alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from prunetune.data.calibration import calibration_samples
from prunetune.data.sources import TextSource, load_text
from prunetune.errors import PrunetuneError
from prunetune.models.arch import Block, get_adapter, unwrap
from prunetune.progress import track


def default_calib_split(source: str) -> str:
    """WikiText-2 calibrates on `valid` (test is for perplexity); other sources on their training part."""
    return "valid" if source == "wikitext2" else "train"


def calibration_ids(calib, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Token ids [n, seqlen] from a LongTensor, a TextSource or a source name (the last two need a tokenizer)."""
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.dtype not in (torch.long, torch.int):
            raise PrunetuneError(f"calib tensor must be integer token ids [n, seqlen], got {calib.dtype} "
                                 f"{tuple(calib.shape)}")
        return calib.long()
    if not isinstance(calib, (str, TextSource)):
        raise PrunetuneError(f"calib must be token ids, a TextSource or a source name, got {type(calib).__name__}")
    if tokenizer is None:
        raise PrunetuneError("calibration from text needs a tokenizer: pass tokenizer=...")
    if isinstance(calib, str):
        calib = load_text(calib, default_calib_split(calib))
    return calibration_samples(tokenizer, calib.text, nsamples, seqlen, seed, calib.name)


class Stats(Protocol):
    @staticmethod
    def prepare(x: torch.Tensor) -> Any: ...

    def accumulate(self, prepared: Any, batch: int) -> None: ...


StatFactory = Callable[[str, nn.Linear, torch.device], Stats]
OnBlock = Callable[[Block, dict[str, Stats]], None]


class _StopForward(Exception):
    """Raised by the block-0 hook: everything after block 0 is not needed to capture its inputs."""


def _to(obj: Any, device: torch.device) -> Any:
    """Move tensors inside (nested) tuples / lists / dicts; leave everything else alone."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def layer_key(adapter, lin: nn.Linear) -> str:
    """A layer's MaskSet key: its name in the plain model (a peft LoRA layer's `.base_layer` dropped)."""
    return adapter.name_of(lin).removesuffix(".base_layer")


def _first(out: Any) -> torch.Tensor:
    """Blocks return a tensor (Llama in transformers 5) or a tuple whose first item is the hidden states."""
    return out if isinstance(out, torch.Tensor) else out[0]


_LIBC = None
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers in glibc's malloc.h
MMAP_THRESHOLD_BYTES = 8 << 20
TRIM_THRESHOLD_BYTES = 64 << 20
STREAM_MMAP_THRESHOLD_BYTES = 1 << 20  # memory first: the streamed path's peak is what it promises


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt  # noqa: B018  (AttributeError on a libc without them)
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc only; a no-op elsewhere).

    glibc keeps freed chunks of large tensors in its arenas, so between blocks the process would otherwise
    hold the previous block's temporaries as resident memory and the peak RSS would grow with the number of
    blocks rather than stay at one block's worth.
    """
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


def bound_heap_growth(memory_first: bool = False) -> None:
    """Serve allocations of 8 MiB and more (scores, masks, activations) from their own mappings (glibc only).

    By default glibc raises its mmap threshold each time a large block is freed, after which tensors of that
    size come from the heap, where the masks kept between them pin the freed space: pruning SmolLM2-135M
    then peaked ~0.4 x the model size above what it finally holds, even for magnitude pruning, which
    allocates nothing that lives. A fixed threshold returns every freed tensor to the OS at once.

    The threshold is 8 MiB, with the heap trimmed only past 64 MiB free, rather than 1 MiB: every fresh page
    of a mapping costs a page fault, and at 1 MiB the many mid-sized temporaries of a block's forward made
    Wanda on SmolLM2 spend 9.3 s of system time in 5.2 M faults over 8 calibration windows, against 2.7-3.5 s
    and 1.6 M faults at 8 MiB + 64 MiB trim, for a peak 3-5 MiB higher
    (`benchmarks/results/pruning_sys_time_probe.json`).

    `memory_first` (the streamed prune, whose point is a bounded peak) keeps the 1 MiB threshold and glibc's
    trim threshold: on a random 8-block width-1024 Llama streamed with Wanda the peak was 714 MiB there against
    739 MiB at 8 MiB / 8 MiB trim and 752-761 MiB at 8 MiB / 64 MiB, for about 1 s more system time.

    Process-wide, idempotent and irreversible (glibc cannot switch its dynamic threshold back on), and a
    fault per fresh page would slow a training loop that allocates activations at every step. So it is
    opt-in: `prune()` never calls it; processes that only prune (the `prunetune prune` command,
    `benchmarks/pruning.py`) call it once before pruning.
    """
    libc = _libc()
    if libc and memory_first:
        libc.mallopt(_M_MMAP_THRESHOLD, STREAM_MMAP_THRESHOLD_BYTES)
    elif libc:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)


def _model_kwargs(model: nn.Module) -> dict:
    return {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, ids: torch.Tensor, batch_size: int,
                         device: torch.device) -> list[tuple[torch.Tensor, tuple, dict]]:
    """(hidden, extra positional args, kwargs) that `block` receives for each calibration batch."""
    captured: list[tuple[torch.Tensor, tuple, dict]] = []

    def hook(_module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.to(device), _to(tuple(args[1:]), device), _to(kwargs, device)))
        raise _StopForward

    model_device = next(unwrap(model).parameters()).device
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for s in range(0, ids.shape[0], batch_size):
            batch = ids[s : s + batch_size].to(model_device)
            try:
                model(input_ids=batch, attention_mask=torch.ones_like(batch), **_model_kwargs(model))
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _hooks(named: dict[str, nn.Linear], stats: dict[str, Stats]) -> list:
    """Forward hooks feeding each linear's input to its statistics; layers fed the same tensor share the work."""
    # (tensor, stats type, prepared): matched by identity; holding the tensor keeps its memory from being
    # reused by a later activation of the same shape, so a match can never be a stale address.
    cache: list[tuple[torch.Tensor, type, Any]] = []

    def make(name: str):
        st = stats[name]

        def hook(_module, inputs, _output):
            x = inputs[0]
            for t, kind, prepared in cache:
                if t is x and kind is type(st):
                    break
            else:
                prepared = st.prepare(x)
                cache.append((x, type(st), prepared))
                del cache[:-3]
            st.accumulate(prepared, x.shape[0] if x.dim() > 2 else 1)

        return hook

    return [lin.register_forward_hook(make(n)) for n, lin in named.items()]


class BlockIO(Protocol):
    """Where a block's weights are between its turns. In memory (the default) they stay in the model;
    `stream.StreamIO` reads them from the checkpoint before the turn and writes them out after it."""

    def load(self, module: nn.Module) -> None: ...

    def release(self, module: nn.Module) -> None: ...


class InMemory:
    """Blocks live in the model; with a calibration device, one block at a time visits it (None: no move)."""

    def __init__(self, home: torch.device | None, device: torch.device | None) -> None:
        self.home, self.device = home, device

    def load(self, module: nn.Module) -> None:
        if self.device is not None:
            module.to(self.device)

    def release(self, module: nn.Module) -> None:
        if self.home is not None:
            module.to(self.home)
            release_freed_memory()


@torch.no_grad()
def sequential(model: nn.Module, ids: torch.Tensor, make_stats: StatFactory, on_block: OnBlock, *,
               targets: set[str] | None = None, device: str | torch.device | None = None, batch_size: int = 1,
               progress: bool | None = None, io: BlockIO | None = None, propagate: bool = True) -> None:
    """Walk the blocks in order: collect statistics, let `on_block` prune, propagate the pruned outputs.

    `targets` limits statistics (and so pruning) to these module names; blocks without targets are still run
    to produce the next block's inputs. `make_stats(name, layer, device)` builds one statistics object.
    `io` brings each block's weights before its turn and takes them after (default: `InMemory`).
    `propagate=False` is a measuring pass (OWL's outlier ratios): `on_block` must leave the block unchanged,
    and the outputs of the statistics forward are the next block's inputs (one forward per block, not two).
    """
    root = unwrap(model)
    adapter = get_adapter(root)
    blocks = adapter.blocks()
    home = next(root.parameters()).device
    device = torch.device(device) if device is not None else home
    io = io if io is not None else InMemory(home, device)
    was_training = root.training
    root.eval()
    try:
        inputs = capture_block_inputs(model, blocks[0].module, ids, batch_size, device)
        for block in track(blocks, "prune blocks", total=len(blocks), show=progress):
            io.load(block.module)
            named = {layer_key(adapter, lin): lin for lin in block.linears.values()}
            if targets is not None:
                named = {n: lin for n, lin in named.items() if n in targets}
            if named:
                stats = {n: make_stats(n, lin, device) for n, lin in named.items()}
                handles = _hooks(named, stats)
                try:
                    for i, (hidden, args, kwargs) in enumerate(inputs):
                        out = _first(block.module(hidden, *args, **kwargs))
                        if not propagate:  # the block will not change: its outputs are the next inputs
                            inputs[i] = (out, args, kwargs)
                        del hidden, out
                finally:
                    for h in handles:
                        h.remove()
                on_block(block, stats)
                del stats
            if propagate or not named:
                for i, (hidden, args, kwargs) in enumerate(inputs):  # in place: each input freed once replaced
                    inputs[i] = (_first(block.module(hidden, *args, **kwargs)), args, kwargs)
                    del hidden
            io.release(block.module)
    finally:
        root.train(was_training)


@torch.no_grad()
def collect_all(model: nn.Module, ids: torch.Tensor, make_stats: StatFactory, targets: set[str], *,
                batch_size: int = 1, progress: bool | None = None) -> dict[str, Stats]:
    """Statistics for every target layer from forward passes of the dense model (one pass per batch)."""
    root = unwrap(model)
    adapter = get_adapter(root)
    home = next(root.parameters()).device
    named = {layer_key(adapter, lin): lin for _, lin in adapter.linears().values()}
    named = {n: lin for n, lin in named.items() if n in targets}
    stats = {n: make_stats(n, lin, home) for n, lin in named.items()}
    handles = _hooks(named, stats)
    was_training = root.training
    root.eval()
    extra = _model_kwargs(root)
    try:
        batches = range(0, ids.shape[0], batch_size)
        for s in track(batches, "calibration pass", total=len(batches), show=progress):
            batch = ids[s : s + batch_size].to(home)
            kw = {"decoder_input_ids": batch} if getattr(root.config, "is_encoder_decoder", False) else {}
            model(input_ids=batch, attention_mask=torch.ones_like(batch), **kw, **extra)
    finally:
        for h in handles:
            h.remove()
        root.train(was_training)
    return stats
