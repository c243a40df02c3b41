"""Test setup: offline assets, quiet progress, shared model cache, small thread count."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"

os.environ.setdefault("PRUNETUNE_PROGRESS", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads crawl on a shared CPU
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if SHARED_WIKITEXT.is_dir():
    os.environ.setdefault("PRUNETUNE_DATA_DIR", str(SHARED_WIKITEXT))


@pytest.fixture(scope="session")
def wikitext_dir() -> Path:
    d = Path(os.environ.get("PRUNETUNE_DATA_DIR", SHARED_WIKITEXT))
    if not (d / "test.txt").is_file():
        pytest.fail(f"WikiText-2 not found at {d}: set PRUNETUNE_DATA_DIR (CI expects ../shared beside the repo)")
    return d


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M, loaded once per session (the GGUF is converted once into the user cache)."""
    from prunetune.models.loading import load_model

    return load_model("smollm2-135m", "causal-lm")


@pytest.fixture()
def tiny_llama():
    from prunetune.models.loading import load_model

    return load_model("tiny-llama", "causal-lm")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: skipped (with the reason) on machines without it, run as usual where it exists."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (gpu tier)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
