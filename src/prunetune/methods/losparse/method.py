"""LoSparse: every targeted weight becomes a low-rank part plus a sparse part, W ≈ U·V + S, pruned while tuning.

Why two parts: at 10–20 % of a layer's parameters, pruning alone deletes the coherent directions every input
uses, and a low-rank factor alone loses the incoherent detail. LoSparse keeps the top singular directions in
U·V and lets PLATON prune S, the residual, during fine-tuning (Li et al. 2023, "LoSparse"; Zhang et al. 2022,
"PLATON"). U, V and S all train.

The pieces, each usable alone:

- `rank_for(m, n, p)`: r = ⌈p·m·n / (m + n)⌉ — U and V then hold about the fraction p of the m×n weight.
- `LowRankSparseLinear`: y = x·Vᵀ·Uᵀ + x·Sᵀ + b, initialised from a Linear's truncated SVD (U = U_r·√Σ_r,
  V = √Σ_r·V_rᵀ, S = W − U·V). S is stored as the module's `weight`, so the shared tools that address a
  Linear's weight (`MaskSet`, `sparsity_report`, the driver's mask enforcement) see the sparse part.
- `PlatonScores`: sensitivity I = |θ·∇θ|, averaged over a window of `deltaT` steps; once a window its mean
  folds into Ī = EMA_β1 and Ū = EMA_β2(|mean − Ī|), score Ī·Ū (Ī alone at β2 = 1, the LoSparse code's default).
  The per-step rule it replaced (issue 29 item 4) measured the same on MiniLM / BBC News at 10% kept, 100 steps,
  3 seeds (94.92% both; paired +0.00 ± 0.45 pt, `benchmarks/results/losparse_minilm_platon_step.json`), so it is
  not kept as an option (deltaT = 1 gives per-step averages, with a mask every step).
- `LosparseSchedule`: the seed's cubic schedule of the kept fraction of S. Warm-ups are in units of
  `warmup_steps` (the seed's `initial_warmup` / `final_warmup`) or, when given, plain step counts
  (`initial_warmup_steps` / `final_warmup_steps`).
- `select_keep`: scores → keep-mask over all targeted S together (one global budget, as in the seed), per
  entry (unstructured) or per row / column (`structured_method` mean|sum|max|min pools the entry scores).
- `Losparse(Method)`: the lifecycle glue: prepare swaps the layers, after_step scores and prunes (after
  `optimizer.step()`, before `zero_grad()`; before the step Adam would revive what was just pruned),
  extra_loss distils from a dense teacher, finalize materialises W' = U·V + S⊙M, and `state_dict` /
  `load_state_dict` carry the PLATON averages, the schedule's step and the fixed mask through every training
  checkpoint (`--resume` continues mid-stage exactly as the uninterrupted run would).

While the cubic schedule runs, each recomputed mask may keep an entry an earlier one pruned (its EMA score
decides; that is PLATON). During the final warm-up the kept fraction is exactly `final_threshold`; as the method
does (`final_mask: recompute`, the default) the scores keep updating and the mask is recomputed whenever they
change (each window's fold, and its first step), each one replacing the previous in the run's `MaskSet`, which
the driver enforces after every step and exports; `final_mask: fixed` computes it once at the warm-up's first
step and freezes it (scores no longer updated). Either way the exported S holds exactly the last mask's zeros.

Exports (`save_factorized`, `load_factorized`; `prunetune.load_model(dir)` dispatches to the latter on the
`losparse.json` marker): the factorised form stores U, V, the bias and only the kept part of S (kept columns
or rows with their indices, or CSR for unstructured), so it is smaller and — at small rank and kept fraction —
faster than dense; the materialised form is a plain HF directory any transformers loads.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.methods.base import Method, MethodContext
from prunetune.methods.losparse.export import save_factorized
from prunetune.methods.losparse.layers import LowRankSparseLinear, factorize, losparse_layers, materialize, parameter_counts
from prunetune.methods.losparse.platon import LosparseSchedule, PlatonScores, select_keep, unit_direction
from prunetune.methods.losparse.spec import LosparseSpec
from prunetune.models.arch import get_adapter
from prunetune.models.loading import load_model
from prunetune.pruning.masks import MaskSet
from prunetune.tuning.distill import kl_soft


class Losparse(Method):
    """The lifecycle glue (see the module docstring)."""

    name = "losparse"
    changes_base_weights = True

    def __init__(self, spec: LosparseSpec | None = None, teacher_model: nn.Module | None = None) -> None:
        self.spec = spec or LosparseSpec()
        self.scores = PlatonScores(self.spec.beta1, self.spec.beta2, self.spec.deltaT)
        self.layers: dict[str, LowRankSparseLinear] = {}
        self.directions: dict[str, str] = {}
        self.layer_info: dict[str, dict] = {}
        self.schedule: LosparseSchedule | None = None
        self.fixed: MaskSet | None = None
        self.t = 0
        self.events: list[dict] = []
        self.teacher = teacher_model
        self._hooks: list = []
        self._student_acts: list[torch.Tensor] = []
        self._teacher_acts: list[torch.Tensor] = []
        self.counts: dict = {}
        self.factorized_dir: Path | None = None
        self.task = "seq-cls"

    # -- lifecycle ---------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        if model.__class__.__name__.startswith("Peft"):
            raise PrunetuneError("LoSparse trains U, V and S itself: run it without LoRA (full fine-tuning, --full)")
        self.schedule = self.spec.schedule(ctx.max_steps)  # raises on a warm-up longer than training
        self.task = ctx.task
        self.layer_info = factorize(model, self.spec.rank_ratio, self.spec.roles)
        self.layers = losparse_layers(model)
        self.directions = {n: unit_direction(self.spec.structured_direction, self.layer_info[n]["role"])
                           for n in self.layers}
        for mod in self.layers.values():
            for p in mod.parameters():
                p.requires_grad_(True)
        self.t = ctx.resumed_from or 0
        if self.spec.kd_weight > 0 or self.spec.layer_weight > 0:
            self._setup_teacher(model, ctx)
        return model

    def after_step(self, model: nn.Module, ctx: MethodContext) -> None:
        self.t += 1
        params = {n: m.weight for n, m in self.layers.items()}
        frozen = self.spec.final_mask == "fixed"
        if self.fixed is not None and frozen:
            self._apply(self.fixed)
            return
        folded = self.scores.update(params)
        keep, recompute = self.schedule.at(self.t)
        final = self.t >= self.schedule.fix_step
        if final and not frozen:
            # the method recomputes the mask at every step of the final warm-up; the scores only change when a
            # window folds, so recomputing then (and at the warm-up's first step) gives the same masks
            recompute = self.t == self.schedule.fix_step or folded
            if not recompute:
                self._apply(self.fixed)
                return
        if not recompute:
            return
        masks = MaskSet(select_keep({n: self.scores.score(n) for n in params if n in self.scores.avg}, keep,
                                    self.spec.pooling, self.directions))
        self._apply(masks)
        kept = sum(int(m.sum()) for _, m in masks.items()) / sum(m.numel() for _, m in masks.items())
        self.events.append({"step": self.t, "keep_target": keep, "kept": kept, "fixed": final})
        if final:
            self.fixed = masks
            ctx.masks.update(masks)  # the driver enforces it after every step and saves it with the export

    def extra_loss(self, model: nn.Module, inputs: dict, outputs: Any,
                   ctx: MethodContext) -> tuple[torch.Tensor | None, dict[str, float]]:
        if self.teacher is None or not model.training:
            self._student_acts.clear()
            return None, {}
        feats = {k: v for k, v in inputs.items() if k != "labels"}
        self._teacher_acts.clear()
        with torch.no_grad():
            t_out = self.teacher(**feats)
        loss = outputs.logits.new_zeros(())
        logs: dict[str, float] = {}
        if self.spec.kd_weight > 0:
            kl = kl_soft(outputs.logits, t_out.logits, self.spec.kd_temp)
            loss = loss + self.spec.kd_weight * self.spec.kd_temp**2 * kl
            logs["kd_kl"] = float(kl.detach())
        if self.spec.layer_weight > 0 and self._student_acts:
            mse = torch.stack([F.mse_loss(s.float(), t.float()) for s, t in zip(self._student_acts, self._teacher_acts)]).mean()
            loss = loss + self.spec.layer_weight * mse
            logs["layer_mse"] = float(mse.detach())
        self._student_acts.clear()
        self._teacher_acts.clear()
        return loss, logs

    def finalize(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """Write the factorised export to `ctx.out/factorized` (when the run has an output dir), then return the
        materialised model W' = U·V + S⊙M that the driver evaluates and exports as a plain HF dir.

        W' is dense (U·V fills every entry), so the S-masks are removed from the run's MaskSet: applied to W'
        they would zero entries that are not zero. S's zeros live on in the factorised export."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.fixed is not None:
            self._apply(self.fixed)
        self.counts = parameter_counts(model)
        if ctx.out is not None:
            self.factorized_dir = save_factorized(model, ctx.tokenizer, Path(ctx.out) / "factorized", self.spec,
                                                  task=ctx.task)
        plain = materialize(model)
        for n in list(self.layers):
            ctx.masks.masks.pop(n, None)
        return plain

    def summary(self) -> dict:
        return {"losparse": {"spec": self.spec.to_dict(), "steps_seen": self.t, "parameters": self.counts,
                             "factorized_dir": str(self.factorized_dir) if self.factorized_dir else None},
                "losparse_schedule": asdict(self.schedule) if self.schedule else None, "losparse_events": self.events,
                "losparse_mask_fixed": self.fixed is not None, "losparse_layers": self.layer_info}

    def to_dict(self) -> dict:
        return {"name": self.name, **self.spec.to_dict()}

    def state_dict(self) -> dict[str, Any]:
        """Everything `after_step` carries from one step to the next, so that a run resumed from a checkpoint
        ends exactly like an uninterrupted one: the step of the cubic schedule, the PLATON averages Ī and Ū of
        every S (restarting them would rank S on a few steps of evidence), the fixed mask once the final
        warm-up has begun, and the mask events so far (for the summary). The schedule is recorded to refuse a
        resume under other settings. Between mask events no other mask is in force: a pruned entry may come back
        (PLATON), so its zeros in S, saved with the weights, are the whole of it."""
        state: dict[str, Any] = {"t": self.t, "platon_emas": self.scores.updates, "events": self.events,
                                 "platon_pending": self.scores.pending, "platon_folds": self.scores.folds,
                                 "schedule": asdict(self.schedule) if self.schedule is not None else None,
                                 "fixed": sorted(self.fixed.names()) if self.fixed is not None else None}
        for n in self.scores.avg:
            state[f"platon_avg/{n}"] = self.scores.avg[n]
            state[f"platon_unc/{n}"] = self.scores.unc[n]
            state[f"platon_acc/{n}"] = self.scores.acc[n]
        for n in (self.fixed.names() if self.fixed is not None else ()):
            state[f"fixed_mask/{n}"] = self.fixed[n].to(torch.uint8)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.schedule is None:
            raise PrunetuneError("LoSparse: load_state_dict needs the prepared model (call prepare first)")
        if state.get("schedule") != asdict(self.schedule):
            raise PrunetuneError("--resume: the checkpoint's LoSparse schedule differs from this run's "
                                 f"({state.get('schedule')} vs {asdict(self.schedule)}): resume with the same settings")
        for key, v in state.items():
            if "/" in key and key.split("/", 1)[1] not in self.layers:
                raise PrunetuneError(f"--resume: the checkpoint's LoSparse state names layer "
                                     f"'{key.split('/', 1)[1]}', which this model does not factorise")
        self.t = int(state["t"])
        self.scores.updates = int(state["platon_emas"])
        self.scores.pending = int(state.get("platon_pending", 0))
        self.scores.folds = int(state.get("platon_folds", self.scores.updates))
        self.events = [dict(e) for e in state["events"]]
        self.scores.avg, self.scores.unc, self.scores.acc = {}, {}, {}
        for n, mod in self.layers.items():
            if f"platon_avg/{n}" in state:
                self.scores.avg[n] = state[f"platon_avg/{n}"].to(mod.weight.device, torch.float32)
                self.scores.unc[n] = state[f"platon_unc/{n}"].to(mod.weight.device, torch.float32)
                acc = state.get(f"platon_acc/{n}")
                self.scores.acc[n] = (acc.to(mod.weight.device, torch.float32) if acc is not None
                                      else torch.zeros_like(self.scores.avg[n]))
        self.fixed = None
        if state["fixed"] is not None:
            self.fixed = MaskSet({n: state[f"fixed_mask/{n}"].to(self.layers[n].weight.device).bool()
                                  for n in state["fixed"]})

    # -- helpers -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _apply(self, masks: MaskSet) -> None:
        for n, mask in masks.items():
            w = self.layers[n].weight
            w.mul_(mask.to(w.device, w.dtype))

    def _setup_teacher(self, model: nn.Module, ctx: MethodContext) -> None:
    
        if self.teacher is None:
            # the student's labels (finetune loads it with the task data's label names) give the teacher's head
            label_names = ctx.extra.get("label_names") or _label_names(model, ctx.task)
            self.teacher = load_model(self.spec.teacher, ctx.task, label_names=label_names).model
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if self.spec.layer_weight > 0:
            s_blocks, t_blocks = get_adapter(model).blocks(), get_adapter(self.teacher).blocks()
            if len(s_blocks) != len(t_blocks):
                raise PrunetuneError(f"layer distillation needs a teacher with as many blocks as the student "
                                     f"({len(t_blocks)} vs {len(s_blocks)})")

            def grab(store: list):
                def hook(_m, _i, out):
                    store.append(out[0] if isinstance(out, tuple) else out)
                return hook

            for b in s_blocks:
                self._hooks.append(b.module.register_forward_hook(grab(self._student_acts)))
            for b in t_blocks:
                self._hooks.append(b.module.register_forward_hook(grab(self._teacher_acts)))


def _label_names(model: nn.Module, task: str) -> list[str] | None:
    """The label names of a classification model's config, in id order (None for other tasks)."""
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if task != "seq-cls" or not id2label:
        return None
    return [id2label[i] for i in sorted(id2label, key=int)]
