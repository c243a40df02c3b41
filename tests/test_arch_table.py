"""The architecture table: every model type the adapters claim, at every granularity it supports.

One table of tiny random models × granularities, one set of shared assertions (peft's test layout). Each
row goes load → prune (Wanda, so the calibration engine runs through the family's blocks) → 2 fine-tuning
steps (LoRA merged with the masks; full fine-tuning for seq2seq; masks enforced after every step) → export
as a plain HF directory → reload with plain
`transformers` Auto classes, and asserts

* the reloaded model's logits equal the in-memory exported model's (bit-exact: same fp32 weights);
* the zeros in the reloaded weights are exactly the masks' zeros, position by position;
* the masks have exactly the count the granularity defines (per row, per layer, global, N:M groups, whole
  rows / columns, whole GQA groups, whole MLP neurons), computed here independently of the pruning code.

T5 and mT5 fine-tune with the seq2seq driver (`tuning.seq2seq`, full fine-tuning on the synthetic pairs).
A type that cannot pass is removed from the adapter's claims, not skipped: `test_table_covers_every_claim`
fails when a claimed type has no row.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from prunetune.models.arch import ADAPTERS, get_adapter
from prunetune.models.export import save_hf_dir
from prunetune.models.loading import TINY_CONFIGS, tiny_model
from prunetune.pruning.api import prune
from prunetune.pruning.masks import MaskSet
from prunetune.pruning.shrink.couplings import couplings

SPARSITY = 0.5
DECODERS = ("llama", "mistral", "qwen2", "qwen3")
ENCODERS = ("bert", "roberta", "xlm-roberta", "distilbert")
SEQ2SEQ = ("t5", "mt5")
# model type -> (task it is built and fine-tuned for, whether the fine-tuning steps run)
TYPES: dict[str, tuple[str, bool]] = {
    **{t: ("causal-lm", True) for t in DECODERS},
    **{t: ("seq-cls", True) for t in ENCODERS},
    **{t: ("seq2seq", True) for t in SEQ2SEQ},
}
# granularity name -> prune() keyword arguments
GRANULARITIES: dict[str, dict] = {
    "row": {"granularity": "row"},
    "layer": {"granularity": "layer"},
    "global": {"granularity": "global"},
    "2:4": {"granularity": "row", "pattern": "2:4"},
    "rows": {"granularity": "rows"},
    "cols": {"granularity": "cols"},
    "heads": {"granularity": "heads"},
    "neurons": {"granularity": "neurons"},
}
TABLE = [(t, g) for t in TYPES for g in GRANULARITIES]


def test_table_covers_every_claim():
    claimed = {t for cls in ADAPTERS for t in cls.model_types}
    assert claimed == set(TYPES) == set(TINY_CONFIGS)


# ------------------------------------------------------------------------------------------ shared data
@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    """A few KB of text and labelled rows: fine-tuning data prep stays out of the table's time."""
    d = tmp_path_factory.mktemp("arch-data")
    words = "the model keeps pruned weights at zero while the adapters learn a small update".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(len(words), (12,), generator=g)) for _ in range(80)]
    (d / "text.txt").write_text("\n".join(lines))
    rows = [{"text": line, "label": "ab"[i % 2]} for i, line in enumerate(lines)]
    (d / "labelled.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d


def _inputs(model_type: str) -> dict:
    ids = torch.randint(5, 250, (2, 12), generator=torch.Generator().manual_seed(1))
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model_type in SEQ2SEQ:
        kw["decoder_input_ids"] = ids[:, :6]
    return kw


def _auto(task: str):
    import transformers as tf

    return {"causal-lm": tf.AutoModelForCausalLM, "seq-cls": tf.AutoModelForSequenceClassification,
            "seq2seq": tf.AutoModelForSeq2SeqLM}[task]


# ------------------------------------------------------------------------------------ shared assertions
def _zeros_by_rows(m: torch.Tensor) -> torch.Tensor:
    return (~m).all(dim=1)


def assert_granularity_counts(model, masks: MaskSet, gran: str) -> None:
    """The masks prune exactly what the granularity defines; counted here, not by the pruning code."""
    adapter = get_adapter(model)
    names = list(adapter.linears())
    assert set(masks.names()) == set(names) or gran in ("heads", "neurons")
    if gran == "global":
        total = sum(masks[n].numel() for n in names)
        assert sum(int((~masks[n]).sum()) for n in names) == math.floor(SPARSITY * total)
        return
    if gran in ("heads", "neurons"):
        g = adapter.attention()
        covered: set[str] = set()
        for block in adapter.blocks():
            for c in couplings(adapter, block, gran):
                removed = None
                for mem in c.members:
                    covered.add(mem.name)
                    m = masks[mem.name]
                    gone = (~m).all(dim=1) if mem.axis == "rows" else (~m).all(dim=0)
                    kept = m.all(dim=1) if mem.axis == "rows" else m.all(dim=0)
                    assert bool((gone | kept).all()), f"{mem.name}: a {mem.axis[:-1]} is partly pruned"
                    per_group = gone.reshape(c.n_groups, mem.chunk)
                    assert bool((per_group.all(1) | ~per_group.any(1)).all()), f"{mem.name}: a group is cut"
                    groups = per_group.all(1)
                    removed = groups if removed is None else removed
                    assert torch.equal(groups, removed), f"{mem.name}: coupled members disagree"
                assert int(removed.sum()) == math.floor(SPARSITY * c.n_groups)
                if gran == "heads":
                    assert c.n_groups == g.num_kv_heads and c.members[0].chunk == g.kv_groups * g.head_dim
        assert covered == set(masks.names())
        return
    for n in names:
        m = masks[n]
        rows, cols = m.shape
        if gran == "row":
            assert bool(((~m).sum(1) == math.floor(SPARSITY * cols)).all()), n
        elif gran == "layer":
            assert int((~m).sum()) == math.floor(SPARSITY * m.numel()), n
        elif gran == "2:4":
            assert bool(((~m).reshape(rows, cols // 4, 4).sum(-1) == 2).all()), n
        elif gran == "rows":
            assert int(_zeros_by_rows(m).sum()) == math.floor(SPARSITY * rows) and int((~m).sum()) % cols == 0, n
        elif gran == "cols":
            assert int(_zeros_by_rows(m.T).sum()) == math.floor(SPARSITY * cols) and int((~m).sum()) % rows == 0, n


def assert_zeros_are_the_masks(model, masks: MaskSet) -> None:
    """Exact sparsity: a weight is zero exactly where its mask prunes (real zeros, position by position)."""
    for name, (_, lin) in get_adapter(model).linears().items():
        zero = lin.weight == 0
        if name in masks:
            assert torch.equal(zero, ~masks[name]), f"{name}: zeros differ from the mask"
        else:
            assert not bool(zero.any()), f"{name}: zeros in a layer that was not pruned"


def assert_plain_reload_identical(model, out, task: str, model_type: str) -> float:
    """Plain transformers loads the export; its logits equal the exported model's. Returns the max diff."""
    reloaded = _auto(task).from_pretrained(out).eval()
    assert type(reloaded).__name__ == type(model).__name__
    model.eval()
    with torch.no_grad():
        a = model(**_inputs(model_type)).logits
        b = reloaded(**_inputs(model_type)).logits
    diff = float((a - b).abs().max())
    assert diff <= 1e-5, f"reloaded logits differ by {diff}"
    return diff


# ------------------------------------------------------------------------------------------------ table
@pytest.mark.parametrize("model_type,gran", TABLE, ids=[f"{t}-{g}" for t, g in TABLE])
def test_arch_table(model_type, gran, tmp_path, data_files):
    from prunetune.data.spec import DataSpec
    from prunetune.tuning.finetune import finetune
    from prunetune.tuning.spec import TuneSpec

    task, tunes = TYPES[model_type]
    loaded = tiny_model(model_type, task, num_labels=2)
    model, tok = loaded.model, loaded.tokenizer
    calib = torch.randint(5, 250, (4, 16), generator=torch.Generator().manual_seed(0))
    masks = prune(model, "wanda", SPARSITY, calib=calib, **GRANULARITIES[gran])
    assert_granularity_counts(model, masks, gran)
    assert_zeros_are_the_masks(model, masks)

    before = {n: lin.weight.detach().clone() for n, (_, lin) in get_adapter(model).linears().items()}
    if tunes and task == "seq2seq":
        from prunetune.tuning.seq2seq import finetune_seq2seq

        cfg = TuneSpec(mode="full", steps=2, batch_size=2, eval_samples=2, lr=5e-2, seqlen=24)
        r = finetune_seq2seq(model, tok, cfg, tmp_path / "ft", data=DataSpec(train="synthetic"),
                             generation_max_length=4, masks=masks)
        assert r["global_step"] == 2
        model, out = r["_model"], tmp_path / "export"
        save_hf_dir(model, tok, out, extra=masks.save)
    elif tunes:
        src = tmp_path / "pruned"
        save_hf_dir(model, tok, src, extra=masks.save)
        data = data_files / ("text.txt" if task == "causal-lm" else "labelled.jsonl")
        cfg = TuneSpec(steps=None, n_samples=4, eval_samples=2, test_samples=2, epochs=1, batch_size=2, seqlen=24,
                       lr=5e-2, kd=False, retention=False)
        r = finetune(str(src), cfg, tmp_path / "ft", task=task, data=DataSpec(train=str(data)), masks=masks)
        assert r["global_step"] == 2
        model, out = r["_model"], tmp_path / "ft" / "model"
    else:
        out = tmp_path / "export"
        save_hf_dir(model, tok, out, extra=masks.save)
    if tunes:
        changed = [n for n, (_, lin) in get_adapter(model).linears().items() if not torch.equal(lin.weight, before[n])]
        assert changed, "the fine-tuning steps changed no weight"
        assert MaskSet.load(out).masks.keys() == masks.masks.keys()

    assert_zeros_are_the_masks(model, masks)
    assert_plain_reload_identical(model, out, task, model_type)
    reloaded = _auto(task).from_pretrained(out)
    assert_zeros_are_the_masks(reloaded, masks)
