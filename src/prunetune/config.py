"""Recipes as validated data: one YAML file (or preset) describes a whole experiment.

A recipe names a model, its data, default settings for each kind of stage, and the ordered stages::

    name: quickstart
    seed: 0
    model: {name: smollm2-135m}
    data: {calib: bbc-news, ppl: [wikitext2, bbc-news]}
    prune: {method: wanda, sparsity: 0.5, nsamples: 16, seqlen: 256}
    tune: {steps: 12, batch_size: 4, seqlen: 256, lora_rank: 8}
    eval: {ppl_seqlen: 512, max_windows: 16}
    stages: [evaluate, prune, evaluate, finetune, evaluate, export]

A stage is a bare type name, or a mapping with `type` plus overrides of that type's section
(`{type: prune, sparsity: 0.6}`). Mistakes are reported in one line that names the key and what it allows;
`--set prune.sparsity=0.6` edits any key before validation (values parsed as YAML scalars/lists).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from prunetune.data.spec import DataSpec
from prunetune.errors import PrunetuneError
from prunetune.methods.composable.spec import ComposeSpec
from prunetune.methods.losparse.spec import LosparseSpec
from prunetune.methods.ordering import OrderSpec
from prunetune.methods.payt.spec import FullEvaluateSpec, PaytSpec
from prunetune.methods.vib.spec import StructuredSpec
from prunetune.pruning.api import registered_name, validate
from prunetune.pruning.criteria import get_criterion
from prunetune.pruning.granularity import parse_nm
from prunetune.pruning.stream import parse_bytes
from prunetune.registry import stage_kind, stage_names
from prunetune.schema import Spec, checked
from prunetune.tuning.spec import TuneSpec

RECIPES_DIR = Path(__file__).resolve().parent / "pipelines" / "recipes"
COMMANDS_DIR = RECIPES_DIR / "commands"  # each command's starting recipe (`prunetune finetune`, `payt`)

#: recipe and stage names become directory names (`OUT/stages/01-<name>`, `runs/<name>-<time>`): one plain path
#: component, so that no recipe, however its names are written, makes a stage write outside its run directory
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


def _safe_name(v: str | None) -> str | None:
    if v is not None and not SAFE_NAME.fullmatch(v):
        raise ValueError(f"{v!r} is not a plain name (letters, digits and . _ + - only, no path separators; it "
                         "names a directory)")
    return v


class ModelSpec(Spec):
    """Which model, and with which head (causal LM for perplexity recipes, seq-cls for task tuning)."""

    name: str = Field("smollm2-135m", description="alias, local HF dir, .gguf or hub id")
    task: Literal["causal-lm", "seq-cls", "auto"] = Field(
        "causal-lm", description="auto = the head the checkpoint was saved with (what `prunetune prune` keeps)")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "fp32", description="dtype to load, prune and export in; auto = the checkpoint's own (what `prunetune "
        "prune` keeps); statistics (norms, Hessians) accumulate in float32 whatever it is")


class PruneSpec(Spec):
    """One-shot pruning with the engine (`prunetune.pruning.api.prune`)."""

    method: str = Field("wanda", description="a registered pruning criterion (prunetune.pruning.criteria): "
                        "wanda | magnitude | sparsegpt | admm | owl-admm | l1-global | l2-cols")
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    pattern: str | None = Field(None, description="N:M pattern such as '2:4' (overrides sparsity)")
    granularity: str | None = Field(
        None, description="row | layer | global | rows | cols | heads | neurons; None = the method's default: "
        "sparsegpt 'layer' (the paper's selection over each 128-column block), magnitude and wanda 'row'")
    nsamples: int = Field(16, ge=1, description="calibration windows")
    seqlen: int = Field(256, ge=2, description="tokens per calibration window")
    skip: list[str] | None = Field(None, description="regexes of module names left dense")
    device: str | None = Field(None, description="where calibration runs, one block at a time: cpu | cuda | "
                               "cuda:N (the model stays on the CPU); None = cpu")
    calib_batch: int = Field(4, ge=1, description="calibration windows per block forward (memory vs speed; "
                             "Wanda's masks are identical across batch sizes)")
    stream: bool | None = Field(
        None, description="read, prune and write one block at a time from a local safetensors directory (models "
        "larger than memory); None = stream when the in-memory path would not fit max_memory")
    max_memory: str | None = Field(None, description="memory budget such as 24GB that decides streaming; None = "
                                   "what the machine has free")
    layer_sparsity: str | None = Field(None, description="uniform | owl (each block its own sparsity from its "
                                       "activation outliers, mean = sparsity); None = the method's own (owl for "
                                       "owl-admm, else uniform)")
    owl_lambda: float = Field(0.08, description="OWL: half-width of the per-block sparsity band")
    owl_m: float = Field(5.0, description="OWL: an outlier scores above M x its block's mean Wanda score")
    refine: str | None = Field(None, description="none | dsnot (mask refinement after the criterion, calibrated "
                               "criteria only); None = the method's own (none)")
    admm_iters: int = Field(60, description="ADMM iterations (admm, owl-admm), in [1, 10000]; the mask reaches "
                            "its target over the first three quarters")
    admm_damp: float = Field(0.01, description="ADMM dampening, a fraction of mean(diag XᵀX), in (0, 10]")

    def method_options(self) -> dict | None:
        """The criterion's own options (ADMM's), None for criteria that take none."""
        return {"iters": self.admm_iters, "damp": self.admm_damp} if hasattr(get_criterion(self.method), "check") \
            else None

    def extras(self) -> dict:
        """The keyword arguments of `prune()` beyond method, sparsity, pattern and granularity."""
        return {"layer_sparsity": self.layer_sparsity, "owl_lambda": self.owl_lambda, "owl_m": self.owl_m,
                "refine": self.refine, "options": self.method_options()}

    @field_validator("method")
    @classmethod
    def _registered_method(cls, v: str) -> str:
        return registered_name(v)

    @field_validator("pattern")
    @classmethod
    def _nm(cls, v: str | None) -> str | None:
        return None if v in (None, "", "none") else checked(parse_nm, v)

    @field_validator("max_memory")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        return None if v is None else checked(parse_bytes, v)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        if v in (None, "", "cpu"):
            return None if v in (None, "") else v
        if not str(v).startswith("cuda"):
            raise ValueError(f"unknown device '{v}'; choose cpu or cuda")
        return v

    @model_validator(mode="after")
    def _engine_accepts(self) -> PruneSpec:
        """The engine's own check (granularity allowed for the method, N:M only per row): once, at load."""
        try:
            validate(self.method, self.sparsity, self.pattern, self.granularity, **self.extras())
        except PrunetuneError as exc:
            raise ValueError(str(exc)) from None
        return self


class EvalSpec(Spec):
    """What every `evaluate` stage measures."""

    ppl_seqlen: int = Field(512, ge=2)
    max_windows: int | None = Field(16, ge=1, description="score the first N windows of each ppl set (None = all)")
    batch_size: int = Field(4, ge=1)
    task: bool = Field(False, description="classification accuracy / macro-F1 on the task's test split")
    harness: list[str] = Field(default_factory=list, description="lm-eval tasks, e.g. bbc_news_topic")
    harness_limit: int | None = Field(None, ge=1)


class Stage(Spec):
    """One step of the pipeline; `options` override the recipe's section for that stage type."""

    type: str = Field(description="a registered stage kind (`prunetune.registry`)")
    name: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        return _safe_name(v)

    @field_validator("type")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in stage_names():  # reported like a Literal: "'x' is not allowed; choose one of: ..."
            names = [repr(n) for n in stage_names()]
            raise PydanticCustomError("literal_error", "Input should be {expected}",
                                      {"expected": ", ".join(names[:-1]) + " or " + names[-1]})
        return v

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, str):
            return {"type": v}
        if isinstance(v, dict):
            v = dict(v)
            known = {"type", "name", "options"}
            extra = {k: v.pop(k) for k in list(v) if k not in known}
            if extra:
                v["options"] = {**v.get("options", {}), **extra}
        return v


class Recipe(Spec):
    """A whole experiment: model, data, per-stage defaults and the ordered stages."""

    name: str = "custom"
    description: str = ""

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        return _safe_name(v)
    seed: int = 0
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    prune: PruneSpec = Field(default_factory=PruneSpec)
    tune: TuneSpec = Field(default_factory=TuneSpec)
    payt: PaytSpec = Field(default_factory=PaytSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    order: OrderSpec = Field(default_factory=OrderSpec)
    compose: ComposeSpec = Field(default_factory=ComposeSpec)
    structured: StructuredSpec = Field(default_factory=StructuredSpec)
    losparse: LosparseSpec = Field(default_factory=LosparseSpec)
    full_evaluate: FullEvaluateSpec = Field(default_factory=FullEvaluateSpec)
    stages: list[Stage] = Field(min_length=1)
    notes: str = Field("", description="free text copied into the report (e.g. how the run was sized)")

    @model_validator(mode="after")
    def _stage_options(self) -> Recipe:
        for i, st in enumerate(self.stages):
            self.stage_spec(i)  # validates the overrides now, not in the middle of a run
        return self

    def stage_spec(self, index: int) -> Spec | None:
        """The effective settings of stage `index`: its section with the stage's overrides applied."""
        st = self.stages[index]
        section = stage_kind(st.type).section
        if section is None:
            if st.options:
                raise ValueError(f"stages.{index}: stage '{st.type}' takes no options (got {', '.join(st.options)})")
            return None
        base: Spec = getattr(self, section)
        merged = {**base.model_dump(), **st.options}
        try:
            return type(base)(**merged)
        except ValidationError as exc:
            raise ValueError(_format_errors(exc, prefix=f"stages.{index}", model=type(base))) from None

    def stage_names(self) -> list[str]:
        """Directory names: `01-evaluate`, `02-prune`, ... (a stage's own `name` replaces the type)."""
        return [f"{i + 1:02d}-{st.name or st.type}" for i, st in enumerate(self.stages)]


# ------------------------------------------------------------------------------------------ errors
def _allowed(model: type[BaseModel] | None, loc: tuple) -> str:
    """The keys a mapping at `loc` accepts, found by walking the models along the path."""
    cur: Any = model
    for part in loc[:-1]:
        if cur is None or isinstance(part, int):
            continue
        field = getattr(cur, "model_fields", {}).get(part)
        ann = field.annotation if field else None
        cur = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if cur is None:
        return ""
    return ", ".join(cur.model_fields)


def _format_errors(exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    err = exc.errors()[0]
    loc = tuple(p for p in err["loc"] if p not in ("function-after[_shorthand(), Stage]",))
    path = ".".join(str(p) for p in ((prefix,) if prefix else ()) + loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _allowed(model, loc)
        return f"unknown key '{path}'" + (f"; allowed keys: {allowed}" if allowed else "")
    if kind in ("literal_error", "enum"):
        choices = err.get("ctx", {}).get("expected", "")
        return f"{path}: {err['input']!r} is not allowed; choose one of: {choices.replace(' or ', ', ')}"
    if kind == "missing":
        return f"missing key '{path}'"
    msg = err["msg"].removeprefix("Value error, ")
    val = err.get("input")
    shown = "" if isinstance(val, (dict, list)) or val is None or str(val) in msg else f" (got {val!r})"
    return f"{path}: {msg}{shown}" if path else msg


def validate_recipe(data: dict, source: str = "recipe") -> Recipe:
    """A Recipe from a plain dict, or a PrunetuneError naming the bad key and what it allows."""
    if not isinstance(data, dict):
        raise PrunetuneError(f"{source}: a recipe must be a mapping of keys, got {type(data).__name__}")
    try:
        return Recipe(**data)
    except ValidationError as exc:
        raise PrunetuneError(f"{source}: {_format_errors(exc, model=Recipe)}") from None
    except TypeError as exc:
        raise PrunetuneError(f"{source}: {exc}") from None


# ------------------------------------------------------------------------------------------ overrides
def parse_override(item: str) -> tuple[list[str], Any]:
    """'prune.sparsity=0.6' -> (['prune', 'sparsity'], 0.6); the value is read as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise PrunetuneError(f"--set needs key=value, got '{item}'")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise PrunetuneError(f"--set key '{key}' is malformed (use section.key=value, e.g. prune.sparsity=0.6)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a raw recipe dict (list items by index: stages.1.sparsity=0.6)."""
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        cur: Any = data
        for i, part in enumerate(path[:-1]):
            if isinstance(cur, list):
                cur = _list_item(cur, part, path[: i + 1])
                if isinstance(cur, str):  # shorthand stage 'prune' -> {'type': 'prune'}
                    idx = int(part)
                    cur = {"type": cur}
                    _parent(data, path[:i])[idx] = cur
                continue
            if not isinstance(cur, dict):
                raise PrunetuneError(f"--set {'.'.join(path)}: '{'.'.join(path[:i])}' is not a section")
            nxt = cur.get(part)
            if nxt is None:
                nxt = cur[part] = {}
            cur = nxt
        last = path[-1]
        if isinstance(cur, list):
            idx = int(last) if last.isdigit() else None
            if idx is None or idx >= len(cur):
                raise PrunetuneError(f"--set {'.'.join(path)}: no item {last} (the list has {len(cur)})")
            cur[idx] = value
        elif isinstance(cur, dict):
            cur[last] = value
        else:
            raise PrunetuneError(f"--set {'.'.join(path)}: '{'.'.join(path[:-1])}' is not a section")
    return data


def _list_item(lst: list, part: str, path: list[str]) -> Any:
    if not part.isdigit() or int(part) >= len(lst):
        raise PrunetuneError(f"--set {'.'.join(path)}: no item {part} (the list has {len(lst)})")
    return lst[int(part)]


def _parent(data: Any, path: list[str]) -> Any:
    cur = data
    for p in path:
        cur = cur[int(p)] if isinstance(cur, list) else cur[p]
    return cur


# ------------------------------------------------------------------------------------------ loading
def preset_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def read_recipe_file(ref: str) -> tuple[dict, str]:
    """Raw dict of a preset name or a YAML path, and a label for messages."""
    path = Path(ref).expanduser()
    if ref in preset_names():
        path = RECIPES_DIR / f"{ref}.yaml"
    elif not path.is_file():
        raise PrunetuneError(f"'{ref}' is neither a preset ({', '.join(preset_names())}) nor a recipe file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise PrunetuneError(f"recipe {path} is not valid YAML{where}") from None
    if data is None:
        raise PrunetuneError(f"recipe {path} is empty")
    return data, path.name


def load_recipe(ref: str = "quickstart", overrides: list[str] | None = None) -> Recipe:
    """A validated Recipe from a preset name or YAML path, with `--set` overrides applied first."""
    data, label = read_recipe_file(ref)
    if not isinstance(data, dict):
        raise PrunetuneError(f"{label}: a recipe must be a mapping of keys")
    return validate_recipe(apply_overrides(data, overrides or []), label)


def recipe_to_dict(recipe: Recipe) -> dict:
    """Plain data (what manifest.json and recipe.yaml record); stages keep their compact form."""
    d = recipe.model_dump(mode="json")
    d["stages"] = [
        (st["type"] if not st["options"] and not st["name"] else
         {"type": st["type"], **({"name": st["name"]} if st["name"] else {}), **st["options"]})
        for st in d["stages"]
    ]
    return d
