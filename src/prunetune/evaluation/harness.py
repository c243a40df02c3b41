"""lm-eval-harness bridge: score an in-memory (pruned, tuned) model on harness tasks.

The model is wrapped in lm-eval's `HFLM` as it is, so what is measured is exactly the object prunetune
produced, masks and all, with no save/reload round trip. Online users can name any harness task
(`hellaswag`, `arc_easy`, ...); prunetune ships local tasks under `evaluation/tasks/` (found through
`TaskManager(include_path=...)`) so the bridge works and is tested offline: `bbc_news_topic` is BBC News
topic classification as 5-way multiple choice by log-likelihood.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from prunetune.errors import PrunetuneError, optional_import

LOCAL_TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def local_tasks() -> list[str]:
    """Names of the tasks shipped with prunetune (one folder each)."""
    return sorted(p.name for p in LOCAL_TASKS_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml")))


def parse_tasks(tasks: str | list[str]) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise PrunetuneError("--harness needs at least one task name (e.g. bbc_news_topic)")
    return names


def _quiet() -> None:
    for name in ("lm-eval", "lm_eval", "lm_eval.api", "lm_eval.evaluator", "lm_eval.models"):
        logging.getLogger(name).setLevel(logging.ERROR)


def harness_evaluate(model: torch.nn.Module, tokenizer, tasks: str | list[str], *, limit: int | None = None,
                     num_fewshot: int | None = None, batch_size: int = 8, seed: int = 0,
                     device: str | None = None) -> dict:
    """Run lm-eval tasks on `model`; returns {task: {metric: value, ...}} plus the protocol of the run.

    Raises PrunetuneError for unknown tasks (listing the local ones) instead of lm-eval's long traceback.
    """
    _quiet()
    simple_evaluate = optional_import("lm_eval", "lm-eval", "lm-eval tasks").simple_evaluate
    HFLM = optional_import("lm_eval.models.huggingface", "lm-eval", "lm-eval tasks").HFLM
    TaskManager = optional_import("lm_eval.tasks", "lm-eval", "lm-eval tasks").TaskManager

    names = parse_tasks(tasks)
    # indexing lm-eval's thousands of task files takes tens of seconds: only when a non-local task is asked
    only_local = set(names) <= set(local_tasks())
    manager = TaskManager(include_path=str(LOCAL_TASKS_DIR), include_defaults=not only_local)
    known = set(manager.all_tasks)
    unknown = [t for t in names if t not in known]
    if unknown:
        raise PrunetuneError(
            f"unknown lm-eval task(s): {', '.join(unknown)}; local tasks: {', '.join(local_tasks())} "
            "(any lm-eval task name works when its dataset is reachable)"
        )
    device = device or str(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
              max_length=getattr(model.config, "max_position_embeddings", None))
    t0 = time.perf_counter()
    try:
        out = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                              log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed, bootstrap_iters=0, verbosity="ERROR")
    except (FileNotFoundError, ConnectionError, OSError) as exc:
        raise PrunetuneError(f"lm-eval could not load the data of {', '.join(names)}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    results: dict = {}
    for task in names:
        raw = out["results"].get(task, {})
        metrics = {k.split(",")[0]: float(v) for k, v in raw.items()
                   if isinstance(v, (int, float)) and "stderr" not in k and k not in ("alias", "sample_len")}
        n = out.get("n-samples", {}).get(task, {})
        results[task] = {
            **metrics,
            "protocol": {
                "harness": "lm-eval " + _lm_eval_version(),
                "task": task,
                "local": task in local_tasks(),
                "num_fewshot": out.get("n-shot", {}).get(task, num_fewshot or 0),
                "documents": n.get("effective", n.get("original")),
                "limit": limit,
                "scoring": "log-likelihood of each choice; acc = argmax, acc_norm = argmax per byte length",
                "seed": seed,
            },
        }
    results["seconds"] = seconds
    return results


def _lm_eval_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("lm-eval")
    except metadata.PackageNotFoundError:  # pragma: no cover
        return "?"
