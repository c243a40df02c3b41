"""Documents of the `bbc_news_topic` lm-eval task, built from the packaged BBC News corpus at run time."""

from __future__ import annotations

from prunetune.data.sources import load_bbc_news
from prunetune.data.tasks import split_labelled

WORDS = 64  # title + first sentences: enough to tell the topic, short enough for CPU scoring


def _short(text: str, words: int = WORDS) -> str:
    return " ".join(text.split()[:words])


def load_docs(**_: object) -> dict:
    """{'test': Dataset} of {'text', 'label'} from prunetune's fixed BBC News test split (seed 0)."""
    import datasets

    data = load_bbc_news()
    test = split_labelled(data)["test"]
    rows = [{"text": _short(e["text"]), "label": int(e["label"])} for e in test]
    return {"test": datasets.Dataset.from_list(rows)}
