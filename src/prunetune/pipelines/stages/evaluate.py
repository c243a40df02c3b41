"""The `evaluate` stage: perplexity, task metrics and sparsity of the current model, with protocols."""

from __future__ import annotations

from pathlib import Path

from prunetune.data.sources import load_labelled, load_text
from prunetune.data.tasks import split_labelled
from prunetune.errors import PrunetuneError
from prunetune.evaluation.harness import harness_evaluate
from prunetune.evaluation.perplexity import perplexity
from prunetune.evaluation.task import evaluate_classification
from prunetune.pipelines.stages.common import dump, sparsity_metric
from prunetune.registry import StageKind, register_stage

PACKAGE = "prunetune.pipelines.stages"  # stages are looked up on the package (tests patch them there)


def run_evaluate(state, out_dir: Path) -> dict:
    """Perplexity on each source, real-zero sparsity, and optionally task accuracy / lm-eval tasks."""
    loaded = state.load()
    metrics, layers = evaluate_model(loaded, state.recipe, state.spec, state.seed)
    dump(out_dir / "layer_sparsity.json", layers)
    return {"metrics": metrics}


register_stage(StageKind("evaluate", f"{PACKAGE}:run_evaluate", "eval", reads=("data.ppl",)))


def evaluate_model(loaded, recipe, spec, seed: int = 0) -> tuple[dict, dict]:
    """All metrics an `evaluate` stage records (each with its protocol) and the per-layer sparsity."""
    metrics: dict = {}
    metric, layers = sparsity_metric(loaded.model)
    metrics["sparsity"] = metric
    task = getattr(loaded, "task", recipe.model.task)  # model.task auto: the head the checkpoint has
    if task == "causal-lm":
        for src_name in recipe.data.ppl:
            src = load_text(src_name, recipe.data.ppl_split, data_dir=recipe.data.data_dir)
            r = perplexity(loaded.model, loaded.tokenizer, src, seqlen=spec.ppl_seqlen, max_windows=spec.max_windows,
                           batch_size=spec.batch_size)
            key = Path(src_name).name if ("/" in src_name or "\\" in src_name) else src_name
            metrics[f"ppl/{key}"] = {"value": r["value"], "seconds": r["seconds"], "protocol": r["protocol"]}
    if spec.task or task == "seq-cls":
        metrics.update(_task_metrics(recipe, loaded))
    if spec.harness:
        res = harness_evaluate(loaded.model, loaded.tokenizer, spec.harness, limit=spec.harness_limit, seed=seed)
        for task in spec.harness:
            r = res[task]
            for k, v in r.items():
                if k != "protocol":
                    metrics[f"harness/{task}/{k}"] = {"value": v, "protocol": r["protocol"]}
    return metrics, layers


def _task_metrics(recipe, loaded) -> dict:
    if getattr(loaded, "task", recipe.model.task) != "seq-cls":
        raise PrunetuneError("eval.task needs model.task: seq-cls (a classification head)")
    data = load_labelled(recipe.data.train)
    test = split_labelled(data, seed=recipe.data.split_seed)["test"]
    r = evaluate_classification(loaded.model, loaded.tokenizer, test, max_length=recipe.tune.seqlen,
                                dataset=data.name)
    r["protocol"]["split_seed"] = recipe.data.split_seed
    return {f"task/{k}": {"value": r[k], "protocol": r["protocol"]} for k in ("accuracy", "macro_f1")}
