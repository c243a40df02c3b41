"""Data sources, fixed splits and the calibration sampler."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from prunetune.data.calibration import calibration_samples, tokenize_text
from prunetune.data.sources import load_bbc_news, load_labelled, load_text
from prunetune.data.tasks import split_labelled, subsample, tokenize_examples
from prunetune.errors import PrunetuneError
from prunetune.models.loading import tiny_tokenizer


@pytest.fixture(scope="module")
def bbc():
    return load_bbc_news()


def _key(ex: dict) -> tuple[str, int]:
    return ex["text"], ex["label"]


# ------------------------------------------------------------------------------------------ bbc news
def test_bbc_news_corpus(bbc):
    assert len(bbc.examples) == 2225
    assert bbc.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert Counter(e["label"] for e in bbc.examples) == {0: 510, 1: 386, 2: 417, 3: 511, 4: 401}


def test_bbc_split_stratified_disjoint_deterministic(bbc):
    parts = split_labelled(bbc, seed=0)
    sizes = {k: len(v) for k, v in parts.items()}
    assert sum(sizes.values()) == 2225
    per_class = Counter(e["label"] for e in bbc.examples)
    for part, frac in (("test", 0.1), ("validation", 0.1)):
        got = Counter(e["label"] for e in parts[part])
        # stratified: each class gets its share, one more at most (a duplicate pair is never split)
        assert all(got[c] - round(n * frac) in (0, 1) for c, n in per_class.items())
    keys = {k: {_key(e) for e in v} for k, v in parts.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    again = split_labelled(load_bbc_news(), seed=0)
    assert [_key(e) for e in again["test"]] == [_key(e) for e in parts["test"]]
    other = split_labelled(bbc, seed=1)
    assert {_key(e) for e in other["test"]} != keys["test"]


def test_split_keeps_duplicates_together():
    from prunetune.data.sources import Labelled

    examples = [{"text": f"doc {i % 30}", "label": i % 2} for i in range(60)]  # every text twice, same label
    for seed in range(5):
        parts = split_labelled(Labelled(examples, ["a", "b"], "dups"), seed=seed)
        texts = {k: {e["text"] for e in v} for k, v in parts.items()}
        assert not texts["train"] & texts["test"] and not texts["validation"] & texts["test"]
        assert sum(map(len, parts.values())) == 60 and len(parts["test"]) >= 6


def test_split_fractions_must_sum_to_one(bbc):
    with pytest.raises(PrunetuneError, match="sum to 1"):
        split_labelled(bbc, (0.5, 0.1, 0.1))


def test_bbc_news_as_text():
    src = load_text("bbc-news", "test")
    assert src.name == "bbc-news/test" and len(src.text) > 100_000


def test_subsample_stratified_and_seeded(bbc):
    test = split_labelled(bbc)["test"]
    a, b = subsample(test, 25, seed=3), subsample(test, 25, seed=3)
    assert [_key(e) for e in a] == [_key(e) for e in b] and len(a) == 25
    assert set(Counter(e["label"] for e in a).values()) == {5}


# ------------------------------------------------------------------------------------------ wikitext
def test_wikitext2_from_data_dir(wikitext_dir, monkeypatch):
    monkeypatch.setenv("PRUNETUNE_DATA_DIR", str(wikitext_dir))
    src = load_text("wikitext2", "test")
    assert src.name == "wikitext2/test" and src.variant.startswith("tokenized")
    assert src.text.startswith(" \n = Robert <unk> = ")
    assert src.text == "\n".join((wikitext_dir / "test.txt").read_text().splitlines())
    assert load_text("wikitext2", "validation", data_dir=str(wikitext_dir)).name == "wikitext2/valid"
    with pytest.raises(PrunetuneError, match="no WikiText-2 'train' split"):
        load_text("wikitext2", "train")
    with pytest.raises(PrunetuneError, match="unknown WikiText-2 split 'dev'"):
        load_text("wikitext2", "dev")


# ------------------------------------------------------------------------------------------ local files
def test_local_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    assert load_text(str(tmp_path / "a.txt")).text == "line one\nline two\n"
    (tmp_path / "b.csv").write_text('body,topic\n"first, with comma",x\nsecond,y\n')
    assert load_text(str(tmp_path / "b.csv"), text_column="body").text == "first, with comma\nsecond"
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "alpha"}) + "\n\n" + json.dumps({"content": "beta"}) + "\n")
    assert load_text(str(tmp_path / "c.jsonl"), text_column="content").text == "alpha\nbeta"
    with pytest.raises(PrunetuneError, match="no column 'text' \\(columns: body, topic\\)"):
        load_text(str(tmp_path / "b.csv"))


def test_local_file_errors(tmp_path):
    with pytest.raises(PrunetuneError, match="does not exist"):
        load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(PrunetuneError, match="is empty"):
        load_text(str(tmp_path / "empty.txt"))
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(PrunetuneError, match="holds no text"):
        load_text(str(tmp_path / "blank.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\nnot json\n')
    with pytest.raises(PrunetuneError, match="bad.jsonl:2 is not valid JSON"):
        load_text(str(tmp_path / "bad.jsonl"))


def test_labelled_files(tmp_path):
    (tmp_path / "t.csv").write_text("review,stars\ngood,pos\nbad,neg\nfine,pos\n")
    data = load_labelled(str(tmp_path / "t.csv"), text_column="review", label_column="stars")
    assert data.label_names == ["neg", "pos"]
    assert [e["label"] for e in data.examples] == [1, 0, 1]
    (tmp_path / "one.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')
    with pytest.raises(PrunetuneError, match="only one class"):
        load_labelled(str(tmp_path / "one.jsonl"))
    with pytest.raises(PrunetuneError, match="no column 'label'"):
        load_labelled(str(tmp_path / "t.csv"), text_column="review")


def test_tokenize_examples_truncates():
    tok = tiny_tokenizer("bert")
    enc = tokenize_examples(tok, [{"text": "x" * 50, "label": 1}, {"text": "ab", "label": 0}], max_length=10)
    assert [len(i) for i in enc["input_ids"]] == [10, 4] and enc["labels"] == [1, 0]


# ------------------------------------------------------------------------------------------ calibration
def test_calibration_seeded_windows():
    tok = tiny_tokenizer("llama")
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    ids = tokenize_text(tok, text)
    assert ids.numel() == 1000  # byte-level: one token per ASCII char
    a = calibration_samples(tok, text, nsamples=4, seqlen=100, seed=0)
    b = calibration_samples(tok, text, nsamples=4, seqlen=100, seed=0)
    c = calibration_samples(tok, text, nsamples=4, seqlen=100, seed=1)
    assert a.shape == (4, 100) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    windows = ids.view(10, 100)
    for row in a:  # every sample is one of the non-overlapping windows
        assert any(torch.equal(row, w) for w in windows)
    assert len({tuple(r.tolist()) for r in a}) == 4


def test_calibration_too_short_exact_message():
    tok = tiny_tokenizer("llama")
    with pytest.raises(PrunetuneError) as err:
        calibration_samples(tok, "a" * 250, nsamples=3, seqlen=100, source="tiny.txt")
    assert str(err.value) == ("calibration text 'tiny.txt' has 250 tokens = 2 windows of 100; 3 x 100 = 300 tokens "
                              "are needed (lower --nsamples or --seqlen)")
    with pytest.raises(PrunetuneError, match="nsamples >= 1 and seqlen >= 2"):
        calibration_samples(tok, "a" * 250, nsamples=0, seqlen=100)
