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

Several processes (`torchrun`, `accelerate launch`): every rank runs this same runner over the same run
directory. The training stages (`StageKind.ranks == "all"` in `prunetune.registry`) run on every rank, which train together (DDP through the
HF Trainer); every other stage (evaluation, pruning with its calibration, export, ...) runs on rank 0 alone
while the others wait. Only rank 0 writes: the run directory, each stage's `.partial` directory and its
commit (manifest, fsync, rename), the run manifest. The ranks meet at a barrier before a stage starts
(rank 0 has prepared its directory), before it is committed (every rank is done with it), and after it is
committed, so every rank then sees the same complete stages, reads the same saved model and, on
`--resume`, continues the same checkpoint.
"""

from __future__ import annotations

import datetime as _dt
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
from prunetune.data.sources import load_labelled, load_text
from prunetune.errors import PrunetuneError
from prunetune.manifest import build_manifest
from prunetune.models.loading import load_model, natural_task
from prunetune.pipelines.stages import resumable_checkpoint
from prunetune.pruning.calibrate import release_freed_memory
from prunetune.pruning.masks import MASKS_FILE, MaskSet
from prunetune.registry import stage_kind
from prunetune.rundir import (  # noqa: F401 (load_run re-exported)
    RunLock, atomic_write_json, atomic_write_text, entries, fsync_tree, load_run, remove_partials, umask_modes)

PAUSE_ENV = "PRUNETUNE_PAUSE_IN_STAGE"  # test hook: stop inside this stage (before it completes) and wait
#: how long the ranks wait for each other (a rank-0-only stage, e.g. calibrating a large model, can take hours)
DIST_TIMEOUT_ENV = "PRUNETUNE_DIST_TIMEOUT_S"


# --------------------------------------------------------------------------------------------- ranks
def world_size() -> int:
    """Processes of this launch (torchrun / accelerate set WORLD_SIZE; 1 for a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0: the one process that writes the run directory and reports."""
    return process_rank() == 0


def init_distributed() -> None:
    """Join the launcher's process group before the first stage, through accelerate, exactly as the Trainer's
    arguments would (gloo on CPU, the accelerator's backend otherwise); the Trainer then reuses the group.

    Initialised here, not by the first Trainer, so that the ranks can wait for each other before any training
    and with a timeout that fits a long rank-0-only stage (`PRUNETUNE_DIST_TIMEOUT_S`, default 6 hours).
    """
    if world_size() < 2:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    from accelerate import PartialState

    cuda = torch.cuda.is_available()
    timeout = _dt.timedelta(seconds=float(os.environ.get(DIST_TIMEOUT_ENV, 6 * 3600)))
    PartialState(cpu=not cuda, backend=None if cuda else "gloo", timeout=timeout)


def wait_for_everyone() -> None:
    """A barrier over the launch's ranks (nothing in a single process)."""
    if world_size() < 2:
        return
    import torch.distributed as dist

    init_distributed()
    dist.barrier()


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
    rank: int = 0  # this process's rank in a multi-process launch (0: the one that saves and evaluates)
    world_size: int = 1
    _loaded: Any = None

    @property
    def seed(self) -> int:
        return self.recipe.seed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def model_spec(self) -> str:
        return str(self.model_dir) if self.model_dir is not None else self.recipe.model.name

    def load(self):
        """The current model (fresh from disk, so resume and straight runs see the same bytes)."""
        if self._loaded is None:
            kw: dict = {}
            task = self.recipe.model.task
            if task == "auto":  # the head the checkpoint was saved with (a classifier keeps its labels)
                task, kw = natural_task(self.model_spec())
            elif task == "seq-cls":  # same labels, same order: a saved head is kept
                kw["label_names"] = load_labelled(self.recipe.data.train).label_names
            self._loaded = load_model(self.model_spec(), task, dtype=self.recipe.model.dtype, **kw)
        return self._loaded

    def tokenizer(self):
        """The current model's tokenizer without loading its weights when they are on disk."""
        if self._loaded is None and self.model_dir is not None:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(self.model_dir)
        return self.load().tokenizer

    def masks(self):
        """The masks of the last pruning (None before any)."""
        if self.model_dir is not None and (self.model_dir / MASKS_FILE).is_file():
            return MaskSet.load(self.model_dir)
        return None


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (all devices) RNGs, as transformers seeds them."""
    # transformers' set_seed does exactly these for CPU and CUDA, but its module (trainer_utils) imports peft and
    # accelerate: ~100 MiB a `prunetune prune` run would carry through its pruning peak
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


# --------------------------------------------------------------------------------------------- run dir
def _stage_dirs(out: Path, recipe: Recipe) -> list[Path]:
    return [out / "stages" / n for n in recipe.stage_names()]


def is_complete(stage_dir: Path) -> bool:
    return (stage_dir / "manifest.json").is_file()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def check_run_dir(out: Path, recipe: Recipe, resume: bool, overwrite: bool) -> None:
    """The checks of `prepare_run_dir`, without writing (every rank makes them, so all fail alike)."""
    saved = out / "recipe.yaml"
    if resume and overwrite:
        raise PrunetuneError("--resume and --overwrite contradict each other: --resume continues the run in "
                             f"{out}, --overwrite replaces it; pass one")
    if resume:
        if not saved.is_file():
            if entries(out):
                raise PrunetuneError(f"{out} is not a prunetune run directory (no recipe.yaml): cannot resume")
        else:
            old = yaml.safe_load(saved.read_text())
            new = recipe_to_dict(recipe)
            if old != new:
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise PrunetuneError(
                    f"--resume: the recipe differs from the one that started {out} (keys: {', '.join(diff)}); "
                    "resume with the same recipe and --set values, or use a new --out"
                )
    elif entries(out) and not overwrite:
        raise PrunetuneError(f"output directory {out} exists and is not empty (pass --resume to continue it, "
                             "--overwrite to replace it)")


def prepare_run_dir(out: Path, recipe: Recipe, resume: bool, overwrite: bool, log=print) -> None:
    """New run: empty dir. Resume: the saved recipe must be the one asked for (else results would mix)."""
    check_run_dir(out, recipe, resume, overwrite)
    saved = out / "recipe.yaml"
    if resume and not saved.is_file():
        log(f"--resume: nothing to resume in {out} (no run there yet): starting a new run")
    elif not resume and entries(out):
        for p in entries(out):  # --overwrite (checked above); the lock this process holds stays
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    remove_partials(out)  # half-written files of a killed run (recipe, manifest, export): never read, redone
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

    Under a multi-process launcher every rank calls this with the same arguments (see the module's
    docstring); only rank 0 logs and writes, and every rank returns the same manifest.
    """
    out = Path(out)
    check_recipe(recipe)
    main = is_main_process()
    if not main:
        log = _quiet
    init_distributed()
    # one writer per run directory: rank 0 takes OUT's lock before anything there is read or touched (a second
    # run, a --resume or an --overwrite of a directory in use is refused in one line; a killed run's is stale)
    lock = RunLock(out).acquire() if main else None
    try:
        if lock is not None and lock.took_over:
            log(f"{out}: took over the lock of a process that is gone (pid {lock.took_over.get('pid', '?')})")
        fresh = not (resume and (out / "recipe.yaml").is_file())
        check_run_dir(out, recipe, resume, overwrite)  # every rank: a refused directory fails on all of them
        wait_for_everyone()
        if main:
            prepare_run_dir(out, recipe, resume, overwrite, log)
        wait_for_everyone()
        try:
            return _run_stages(recipe, out, log, resumable_checkpoint if resume else None)
        except BaseException:
            if main and fresh and not _anything_to_resume(out, recipe, resumable_checkpoint):
                _remove_run_files(out)  # nothing to resume: a first stage that fails leaves no half-made run
            raise
    finally:
        if lock is not None:
            lock.release()


def _quiet(msg: str) -> None:
    """The log of ranks other than 0 (rank 0 reports for all)."""
    del msg


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
    check_inputs(recipe)
    for i, st in enumerate(recipe.stages):
        kind = stage_kind(st.type)
        check = kind.load_check()
        if check is not None:
            check(recipe.stage_spec(i))
        if kind.ranks == "single" and world_size() > 1:
            raise PrunetuneError(f"stage '{st.type}' runs its trainings in one process: launch it without torchrun "
                                 f"/ accelerate (this launch has {world_size()} processes)")


def _local(source: str | None) -> bool:
    """A source that names a local file (a named corpus or a hub dataset is checked where it is loaded)."""
    if not source:
        return False
    path = Path(source).expanduser()
    return path.suffix in (".txt", ".csv", ".jsonl") or path.exists()


def check_inputs(recipe: Recipe) -> None:
    """The local files a recipe reads (training, calibration, perplexity data; a teacher directory) exist and
    hold what the stages need, checked before any stage runs: a typo in a path, an empty file or a CSV
    without its text column fails in a second, not after pruning or an hour of training."""
    reads = {r for st in recipe.stages for r in stage_kind(st.type).reads}  # what each stage kind declares
    d = recipe.data
    if reads & {"data.train", "data.train:labelled"} and _local(d.train):
        if recipe.model.task == "seq-cls" or "data.train:labelled" in reads:
            load_labelled(d.train)
        else:
            load_text(d.train, d.train_split, data_dir=d.data_dir)
    if "data.calib" in reads and _local(d.calib):
        load_text(d.calib, d.calib_split, data_dir=d.data_dir)
    if "data.ppl" in reads:
        for src in d.ppl:
            if _local(src):
                load_text(src, d.ppl_split, data_dir=d.data_dir)
    teacher = recipe.tune.teacher if recipe.tune.kd and "tune.teacher" in reads else None
    for t in (teacher, recipe.losparse.teacher if "losparse.teacher" in reads else None):
        if t and t not in ("initial", "dense") and not Path(t).expanduser().exists():
            raise PrunetuneError(f"teacher {t} does not exist (a model directory, or initial | dense)")


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


def _run_stages(recipe: Recipe, out: Path, log, resumable_checkpoint=None) -> dict:
    names = recipe.stage_names()
    dirs = _stage_dirs(out, recipe)
    model_dir: Path | None = None
    history: list[dict] = []
    rank, world = process_rank(), world_size()
    main = rank == 0
    t_run = time.perf_counter()
    for i, (st, name, sdir) in enumerate(zip(recipe.stages, names, dirs)):
        label = f"[{i + 1}/{len(names)}] {name}"
        if is_complete(sdir):  # every rank sees the same: the last commit happened before a barrier
            man = _read_json(sdir / "manifest.json")
            if man.get("stage_config") != _stage_config(recipe, i):
                raise PrunetuneError(f"stage {name} in {out} was run with other settings; use a new --out")
            log(f"{label}: complete, skipped (resume)")
        else:
            log(f"{label} ...")
            tmp = sdir.with_name(sdir.name + ".partial")
            # every rank judges the interrupted stage's checkpoint (read only) before rank 0 touches the directory
            resumed = _resume_point(tmp, st.type, resumable_checkpoint, log, label)
            wait_for_everyone()
            if main:
                if not resumed:
                    shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True, exist_ok=True)
            wait_for_everyone()
            seed_everything(recipe.seed + i)
            state = RunState(recipe, out, i, name, recipe.stage_spec(i), model_dir, list(history), resume=resumed,
                             rank=rank, world_size=world)
            _reset_peak_rss()
            t0 = time.perf_counter()
            kind = stage_kind(st.type)
            result = (kind.load()(state, tmp) or {}) if main or kind.ranks == "all" else {}
            seconds = time.perf_counter() - t0
            peak = _peak_rss_mb()
            del state
            _release_memory()
            wait_for_everyone()  # every rank has written its part of the stage (e.g. its rank file) before commit
            if main:
                _pause_if_asked(name, tmp)
                man = {
                    "stage": name, "type": st.type, "index": i, "stage_config": _stage_config(recipe, i),
                    "seed": recipe.seed + i, "seconds": seconds, "peak_rss_mb": peak,
                    "metrics": result.get("metrics", {}), "artifacts": result.get("artifacts", {}),
                    "model_in": str(model_dir) if model_dir else recipe.model.name,
                    "produces_model": stage_kind(st.type).produces_model, "world_size": world,
                }
                (tmp / "manifest.json").write_text(json.dumps(man, indent=2, default=str))
                umask_modes(tmp)
                fsync_tree(tmp)  # durable before it is published: a crash never leaves a complete-looking stage
                tmp.rename(sdir)  # the stage is complete exactly when this rename has happened
                rss = f" (peak RSS {peak:,.0f} MiB)" if peak else ""
                log(f"{label}: done in {seconds:.1f}s{rss} {_summary(man['metrics'])}")
            wait_for_everyone()  # committed before any rank reads it or starts the next stage
            if not main:
                man = _read_json(sdir / "manifest.json")
        history.append(man)
        if stage_kind(st.type).produces_model:
            model_dir = sdir / "model"
        if main:
            write_run_manifest(out, recipe, history, complete=(i == len(names) - 1))
    return write_run_manifest(out, recipe, history, complete=True, wall=time.perf_counter() - t_run, write=main)


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
                       wall: float | None = None, write: bool = True) -> dict:
    """The run's manifest.json, rebuilt from the stage manifests (so a resumed run records the same metrics);
    `write=False`: only built (the ranks other than 0)."""
    timings = {h["stage"]: h["seconds"] for h in history}
    if wall is not None:
        timings["wall_this_invocation"] = wall
    man = build_manifest(
        "run", recipe_to_dict(recipe), seed=recipe.seed,
        metrics={h["stage"]: h["metrics"] for h in history}, timings=timings,
        extra={"status": "complete" if complete and len(history) == len(recipe.stages) else "running",
               "stages": [h["stage"] for h in history], "recipe_name": recipe.name,
               "world_size": world_size()},
    )
    if write:
        atomic_write_json(out / "manifest.json", man)
    return man


def recipe_from_run(run_dir: Path) -> Recipe:
    return validate_recipe(yaml.safe_load((run_dir / "recipe.yaml").read_text()), str(run_dir / "recipe.yaml"))
