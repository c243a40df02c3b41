"""Run a recipe: stages in order, each atomic and resumable, ending in manifest.json and report.md.

Layout of a run directory::

    OUT/recipe.yaml               the validated recipe (with --set overrides applied)
    OUT/manifest.json             recipe, versions, seed, git rev, timings and metrics of every stage
    OUT/stages/01-evaluate/       one directory per stage, written as 01-evaluate.partial and renamed
    OUT/stages/02-prune/model/    stages that change the model save it (safetensors HF dir + masks)
    OUT/report.md, OUT/plots/     the human summary

Why the model is *reloaded* from the last saved stage before each stage: an uninterrupted run and a run
killed (even by SIGKILL) and resumed then start every stage from the same bytes, so they end with the same
metrics by construction, not by luck. Each stage also reseeds every RNG from the recipe seed and its index.

A stage that trains (finetune, payt) checkpoints inside its `.partial` directory
(`NN-stage.partial/tune/checkpoints/checkpoint-N`, every `tune.save_steps` steps and at each epoch end).
`--resume` keeps such a directory when it holds a complete checkpoint and the stage continues from the last
one (weights, optimizer, scheduler, RNG, data position, masks and the running loss sums), so it ends with
the same bytes as an uninterrupted run; a checkpoint cut short by the kill is passed over for the one
before it, and a stage with none starts over. Every other `.partial` directory is never trusted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prunetune.config import Recipe, recipe_to_dict, validate_recipe
from prunetune.errors import PrunetuneError
from prunetune.rundir import atomic_write_json, atomic_write_text, fsync_tree, load_run, umask_modes  # noqa: F401 (load_run re-exported)

PAUSE_ENV = "PRUNETUNE_PAUSE_IN_STAGE"  # test hook: stop inside this stage (before it completes) and wait


@dataclass
class RunState:
    """What a stage needs from the run: recipe, its own settings, where the current model lives."""

    recipe: Recipe
    out: Path
    index: int
    name: str
    spec: Any
    model_dir: Path | None  # the last saved model (None: the recipe's original model)
    history: list[dict] = field(default_factory=list)  # manifests of the completed stages before this one
    resume: bool = False  # continue the training in out_dir from its last complete checkpoint
    _loaded: Any = None

    @property
    def seed(self) -> int:
        return self.recipe.seed

    def model_spec(self) -> str:
        return str(self.model_dir) if self.model_dir is not None else self.recipe.model.name

    def load(self):
        """The current model (fresh from disk, so resume and straight runs see the same bytes)."""
        if self._loaded is None:
            from prunetune.models.loading import load_model

            kw: dict = {}
            task = self.recipe.model.task
            if task == "auto":  # the head the checkpoint was saved with (a classifier keeps its labels)
                from prunetune.models.loading import natural_task

                task, kw = natural_task(self.model_spec())
            elif task == "seq-cls":  # same labels, same order: a saved head is kept
                from prunetune.data.sources import load_labelled

                kw["label_names"] = load_labelled(self.recipe.data.train).label_names
            self._loaded = load_model(self.model_spec(), task, **kw)
        return self._loaded

    def tokenizer(self):
        """The current model's tokenizer without loading its weights when they are on disk."""
        if self._loaded is None and self.model_dir is not None:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(self.model_dir)
        return self.load().tokenizer

    def masks(self):
        """The masks of the last pruning (None before any)."""
        from prunetune.pruning.masks import MASKS_FILE, MaskSet

        if self.model_dir is not None and (self.model_dir / MASKS_FILE).is_file():
            return MaskSet.load(self.model_dir)
        return None


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (all devices) RNGs, as transformers seeds them."""
    from transformers import set_seed

    set_seed(seed)


# --------------------------------------------------------------------------------------------- run dir
def _stage_dirs(out: Path, recipe: Recipe) -> list[Path]:
    return [out / "stages" / n for n in recipe.stage_names()]


def is_complete(stage_dir: Path) -> bool:
    return (stage_dir / "manifest.json").is_file()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def prepare_run_dir(out: Path, recipe: Recipe, resume: bool, overwrite: bool, log=print) -> None:
    """New run: empty dir. Resume: the saved recipe must be the one asked for (else results would mix)."""
    saved = out / "recipe.yaml"
    if resume:
        if not saved.is_file():
            if out.exists() and any(out.iterdir()):
                raise PrunetuneError(f"{out} is not a prunetune run directory (no recipe.yaml): cannot resume")
            log(f"--resume: nothing to resume in {out} (no run there yet): starting a new run")
        else:
            old = yaml.safe_load(saved.read_text())
            new = recipe_to_dict(recipe)
            if old != new:
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise PrunetuneError(
                    f"--resume: the recipe differs from the one that started {out} (keys: {', '.join(diff)}); "
                    "resume with the same recipe and --set values, or use a new --out"
                )
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise PrunetuneError(f"output directory {out} exists and is not empty (pass --resume to continue it, "
                                 "--overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stages").mkdir(exist_ok=True)
    ours = {d.name + ".partial" for d in _stage_dirs(out, recipe)} if resume else set()
    for partial in (out / "stages").glob("*.partial"):  # left by a killed run: a stage's own is judged by it
        if partial.name not in ours:
            shutil.rmtree(partial)
    atomic_write_text(saved, yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))


def _pause_if_asked(name: str, tmp: Path) -> None:
    """Test hook: announce, then wait to be killed, while the stage's work sits in its .partial dir."""
    if os.environ.get(PAUSE_ENV) == name:
        (tmp / ".paused").write_text(str(os.getpid()))
        if os.environ.get("PRUNETUNE_PAUSE_SELF_KILL") == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)


# --------------------------------------------------------------------------------------------- run
def run_recipe(recipe: Recipe, out: Path | str, *, resume: bool = False, overwrite: bool = False,
               log=print) -> dict:
    """Run (or resume) `recipe` into `out`; returns the run manifest.

    The human report (report.md, plots) is not written here: `reporting` reads run directories and the
    runner does not import it (layers point down); `prunetune run` writes it after this returns.
    """
    from prunetune.pipelines.compose import run_compose
    from prunetune.pipelines.stages import STAGES, produces_model, resumable_checkpoint

    stages = {**STAGES, "compose": run_compose}  # compose builds on stages' helpers, so it is joined here

    out = Path(out)
    check_recipe(recipe)
    fresh = not (resume and (out / "recipe.yaml").is_file())
    prepare_run_dir(out, recipe, resume, overwrite, log)
    try:
        return _run_stages(recipe, out, stages, produces_model, log, resumable_checkpoint if resume else None)
    except BaseException:
        if fresh and not _anything_to_resume(out, recipe, resumable_checkpoint):
            _remove_run_files(out)  # nothing to resume: a first stage that fails leaves no half-made run
        raise


def _anything_to_resume(out: Path, recipe: Recipe, resumable_checkpoint) -> bool:
    """A complete stage, or a training stage's checkpoint (an interrupted hours-long fine-tuning, Ctrl-C
    included, keeps what --resume continues from)."""
    for st, d in zip(recipe.stages, _stage_dirs(out, recipe)):
        if is_complete(d) or resumable_checkpoint(st.type, d.with_name(d.name + ".partial"))[0] is not None:
            return True
    return False


def check_recipe(recipe: Recipe) -> None:
    """The methods' own checks of their stage settings, before any run directory exists (config.py holds the
    schema alone, so that the layers below can read their defaults from it)."""
    from prunetune.pipelines.compose import check_compose

    for i, st in enumerate(recipe.stages):
        if st.type == "compose":
            check_compose(recipe.stage_spec(i))


def _remove_run_files(out: Path) -> None:
    """What `prepare_run_dir` and a failed first stage wrote; `out` itself stays (the CLI removes it if empty)."""
    shutil.rmtree(out / "stages", ignore_errors=True)
    for name in ("recipe.yaml", "manifest.json"):
        (out / name).unlink(missing_ok=True)


def _resume_point(tmp: Path, stage_type: str, resumable_checkpoint, log, label: str) -> bool:
    """Whether the interrupted stage in `tmp` continues from a checkpoint (else its `tmp` is cleared)."""
    if resumable_checkpoint is None or not tmp.is_dir():
        return False
    ckpt, skipped = resumable_checkpoint(stage_type, tmp)
    for why in skipped:
        log(f"{label}: {why}; passed over")
    if ckpt is None:
        return False
    log(f"{label}: resuming the interrupted stage from {ckpt.name}")
    return True


def _run_stages(recipe: Recipe, out: Path, stages: dict, produces_model, log, resumable_checkpoint=None) -> dict:
    names = recipe.stage_names()
    dirs = _stage_dirs(out, recipe)
    model_dir: Path | None = None
    history: list[dict] = []
    t_run = time.perf_counter()
    for i, (st, name, sdir) in enumerate(zip(recipe.stages, names, dirs)):
        if is_complete(sdir):
            man = _read_json(sdir / "manifest.json")
            if man.get("stage_config") != _stage_config(recipe, i):
                raise PrunetuneError(f"stage {name} in {out} was run with other settings; use a new --out")
            log(f"[{i + 1}/{len(names)}] {name}: complete, skipped (resume)")
        else:
            log(f"[{i + 1}/{len(names)}] {name} ...")
            tmp = sdir.with_name(sdir.name + ".partial")
            resumed = _resume_point(tmp, st.type, resumable_checkpoint, log, f"[{i + 1}/{len(names)}] {name}")
            if not resumed:
                shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)
            seed_everything(recipe.seed + i)
            state = RunState(recipe, out, i, name, recipe.stage_spec(i), model_dir, list(history), resume=resumed)
            _reset_peak_rss()
            t0 = time.perf_counter()
            result = stages[st.type](state, tmp) or {}
            seconds = time.perf_counter() - t0
            peak = _peak_rss_mb()
            del state
            _release_memory()
            _pause_if_asked(name, tmp)
            man = {
                "stage": name, "type": st.type, "index": i, "stage_config": _stage_config(recipe, i),
                "seed": recipe.seed + i, "seconds": seconds, "peak_rss_mb": peak, "metrics": result.get("metrics", {}),
                "artifacts": result.get("artifacts", {}), "model_in": str(model_dir) if model_dir else
                recipe.model.name, "produces_model": produces_model(st.type),
            }
            (tmp / "manifest.json").write_text(json.dumps(man, indent=2, default=str))
            umask_modes(tmp)
            fsync_tree(tmp)  # durable before it is published: a crash never leaves a complete-looking stage
            tmp.rename(sdir)  # the stage is complete exactly when this rename has happened
            rss = f" (peak RSS {peak:,.0f} MiB)" if peak else ""
            log(f"[{i + 1}/{len(names)}] {name}: done in {seconds:.1f}s{rss} {_summary(man['metrics'])}")
        history.append(man)
        if produces_model(st.type):
            model_dir = sdir / "model"
        write_run_manifest(out, recipe, history, complete=(i == len(names) - 1))
    return write_run_manifest(out, recipe, history, complete=True, wall=time.perf_counter() - t_run)


def _reset_peak_rss() -> None:
    """Start a new peak-RSS window for the next stage (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float | None:
    """The process's peak resident memory since the last reset, in MiB (None where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _release_memory() -> None:
    """Hand the finished stage's freed memory back to the OS, so later stages do not stack on its peak.

    Every stage reloads the model from disk; without this, glibc keeps the freed arenas of the stage before.
    """
    import gc

    from prunetune.pruning.calibrate import release_freed_memory

    gc.collect()
    release_freed_memory()


def _stage_config(recipe: Recipe, i: int) -> dict:
    spec = recipe.stage_spec(i)
    return {"type": recipe.stages[i].type, "settings": spec.model_dump(mode="json") if spec else {},
            "model": recipe.model.model_dump(mode="json"), "data": recipe.data.model_dump(mode="json"),
            "seed": recipe.seed}


def _summary(metrics: dict) -> str:
    parts = []
    for k, v in metrics.items():
        if isinstance(v, dict) and isinstance(v.get("value"), (int, float)):
            parts.append(f"{k}={v['value']:.4g}")
    return " ".join(parts)


def write_run_manifest(out: Path, recipe: Recipe, history: list[dict], complete: bool,
                       wall: float | None = None) -> dict:
    """The run's manifest.json, rebuilt from the stage manifests (so a resumed run records the same metrics)."""
    from prunetune.manifest import build_manifest

    timings = {h["stage"]: h["seconds"] for h in history}
    if wall is not None:
        timings["wall_this_invocation"] = wall
    man = build_manifest(
        "run", recipe_to_dict(recipe), seed=recipe.seed,
        metrics={h["stage"]: h["metrics"] for h in history}, timings=timings,
        extra={"status": "complete" if complete and len(history) == len(recipe.stages) else "running",
               "stages": [h["stage"] for h in history], "recipe_name": recipe.name},
    )
    atomic_write_json(out / "manifest.json", man)
    return man


def recipe_from_run(run_dir: Path) -> Recipe:
    return validate_recipe(yaml.safe_load((run_dir / "recipe.yaml").read_text()), str(run_dir / "recipe.yaml"))
