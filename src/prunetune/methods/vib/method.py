"""VIB structured pruning (TVA-Prune / VTrans): learn which KV groups, neurons and hidden channels carry
information, with the model's weights frozen.

Every structure gets a gate z = μ + σ·ε (ε ~ N(0, 1), resampled per example while training) that multiplies
what the structure contributes:

* a KV group scales the o_proj input columns its query heads produce (forward pre-hook on o_proj);
* a neuron scales its down_proj input column (pre-hook on down_proj);
* a hidden channel scales the residual stream: the embedding output and the o_proj / down_proj outputs (one
  z per forward, shared by every layer, so the residual stream is exactly z ⊙ (ungated stream)).

The loss is the LM loss on calibration text + `kl_factor` × VIBNet's closed-form information penalty
½ Σ log(1 + μ²/σ²), + a Lagrangian that pulls the kept fraction of block parameters to the target:
λ₁(ŝ − t) + λ₂(ŝ − t)², where ŝ is the expected sparsity from soft keep-probabilities
sigmoid(−β·(log σ² − log μ²)) (β = 10: sharp enough that ŝ tracks the thresholded count) and t ramps from 0
to `sparsity` over the first `lagrangian_warmup` of the steps. The multipliers maximise the loss
(gradient ascent: their gradients are negated before an ordinary Adam step, the seed's negative learning
rate; torch refuses a negative one). `att_mul` weighs attention parameters in ŝ.

The task term is the LM loss (`vib_loss="lm"`) or, for short budgets, the KL from the dense model's next-token
distribution to the gated model's (`vib_loss="kd"`; the dense pass is the same model with the hooks bypassed).
Why KD on CPU budgets: at z = 1 the KL and its gradient are exactly 0, so a gate's gradient carries only the
second-order signal (how much its noise hurts), while the LM loss adds each example's first-order gradient
(large, zero-mean noise). SmolLM2 at 30% of block parameters, 8 test windows (BENCHMARKS.md, structured):
LM loss, VIB_LR 0.5 on μ and σ, 16 x 1 x 256 tokens: ppl 3,543; KD, 16 x 2 x 256 tokens, lr 0.2 on log σ² and
0.01 on μ, uniform widths: 99 (FLAP 87.5, Wanda 139). No LM run at the KD settings was afforded on the CPU. The gates' μ get their own, smaller learning rate (`vib_mu_lr`): μ stays near 1,
so folding it is a mild rescale, not a new model. `antithetic` pairs each example with the negated noise
(cancels the first-order term for the LM loss at twice the tokens).

A structure is kept where log σ² − log μ² < 0. Then the instant weight update: each kept gate's mean μ is
folded into the weights it scales (o_proj columns, down_proj columns; embedding columns and o/down rows for
hidden channels, with the final norm's gain divided by μ when the LM head is tied to the embedding), so the
pruned model computes what the gated model computes in eval mode (z = μ on kept structures, 0 elsewhere)
and needs no fine-tuning to be usable. Uniform widths and rounding then come from `pruning.shrink.widths`:
`vib_widths="learned"` takes the KV-group count (and hidden width) from the thresholded gates, `"uniform"` the
baselines' rule (every structure keeps the same fraction), so that only VIB's ranking differs; at a short
budget the thresholded count has not converged (1% removed of a 30% target after 16 steps) and the learned
KV count keeps 3 of 3 groups (ppl 217, with μ lr 0.02 and multiplier lr 0.5; 99 with the uniform 2 of 3).

Centred gates (`vib_center=True`) change what removal means. A plain gate multiplies a structure's output x, so
z = 0 removes x and its mean alike; FLAP instead replaces a removed structure by its calibration mean (a bias),
which costs only the structure's fluctuation. With `center` a head or neuron gate computes m + z·(x − m), m the
dense model's calibration mean of that o_proj / down_proj input: the noise probes the fluctuation, removal
leaves m, and the fold writes W·m (removed) and W·(1 − μ)·m (kept) into the stock `attention_bias` /
`mlp_bias` biases. Gate training then sees exactly the removal the export makes. On SmolLM2 at 30% (same 16
steps, same 8 windows) it took VIB from 99.1 to 90.6 (FLAP 87.5); BENCHMARKS.md has the rows.

`constraint="per_layer"` (uniform widths only) replaces the one global Lagrangian by one multiplier pair per
(kind, layer): each layer's thresholded count of KV groups and of neurons is pulled to the uniform width the
export will keep, since with uniform widths only the ranking inside a layer decides. Each term is weighted by
the share of block parameters it governs, so a multiplier pushes a gate as hard as the global one would and the
same multiplier lr serves both. On SmolLM2 at 16 steps (8 windows) it gave 224.7 against 243.4 at 50% and 81.1
against 79.3 at 30%; 16 steps do not bring every layer to its width (kept neurons ranged 580-1,453 for a
width of 704), so the global constraint stays the default.

At this budget the gates rank KV groups far better than neurons: 90 head gates and 46,080 neuron gates learn
from the same 8,192 tokens. With the same trained gates (benchmarks/_vib_selection.py, 8 windows), VIB's KV
groups with FLAP's neurons gave 73.1 at 30% and 125.8 at 50% of block parameters, against 79.3 / 243.4 for
VIB's own selection and 87.5 / 179.8 for FLAP's. `vib_neuron_ranking="flap"` is that hybrid: the gates still
train on both kinds (the neuron noise is part of what the head gates learn under), the KV groups come from
the gates, the neurons from FLAP's fluctuation of the dense model, and the fold is unchanged (kept
structures scaled by μ, removed ones left at their means).

Longer gate training (issue 29 item 8). At a constant lr, 4x the steps made every selection worse: Adam moves
each gate by about its lr per step, so more steps were a longer walk driven mostly by the noise of 2 x 256-token
gradients. `vib_lr_steps` scales both gate lrs by vib_lr_steps / steps (`budget_scale`). With that, μ's lr equal
to the gate lr and the gap rule, pure VIB improves with the budget: 232 / 88 / 83 at 1x / 4x / 16x at 50% (FLAP
180) and 92 / 54 / 44 at 30% (64 windows; BENCHMARKS.md).
"""

from __future__ import annotations

import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.methods.base import Method, MethodContext
from prunetune.methods.vib.gates import EPS, GateBank, VibGates
from prunetune.methods.vib.spec import StructuredSpec
from prunetune.models.arch import get_adapter, unwrap
from prunetune.pruning.shrink.surgery import ensure_biases, shrink_selection
from prunetune.pruning.shrink.widths import (
    Geometry,
    Selection,
    Widths,
    allocate_widths,
    geometry,
    parse_structures,
    select,
)

NSGD_CLIP = 3.0  # "nsgd": a gate moves at most 3 x lr per step (unclipped, one spike sent log σ² to inf)

OPTIMIZERS = ("adam", "nsgd")  # gates: Adam per gate, or the gradient over its kind's RMS per step (NSGD_CLIP)
CONSTRAINTS = ("global", "per_layer")  # one kept fraction, or every layer's count of each gated kind


def check_options(spec: StructuredSpec, *, optimizer: str, constraint: str, lr_decay: float, beta: float,
                  compensate: bool) -> None:
    """The one-line errors for option combinations VIB cannot run (the spec's own fields are checked by pydantic
    as it is built; these involve the method's keyword options or more than one field)."""
    if not 0.0 <= lr_decay <= 1.0:
        raise PrunetuneError(f"lr_decay is a fraction in [0, 1], got {lr_decay}")
    if not beta > 0:
        raise PrunetuneError(f"beta must be > 0, got {beta}")
    if optimizer not in OPTIMIZERS:
        raise PrunetuneError(f"vib optimizer must be 'adam' or 'nsgd', got '{optimizer}'")
    if constraint not in CONSTRAINTS:
        raise PrunetuneError(f"vib constraint must be 'global' or 'per_layer', got '{constraint}'")
    if constraint == "per_layer" and spec.vib_widths != "uniform":
        raise PrunetuneError("vib constraint 'per_layer' drives every layer to the uniform widths: it needs "
                             "widths 'uniform' (learned widths come from the global constraint)")
    if spec.vib_neuron_ranking == "flap" and not spec.vib_center:
        raise PrunetuneError("vib neuron_ranking 'flap' ranks neurons by FLAP's fluctuation, with removed neurons "
                             "left at their means: it needs center")
    if spec.split == "measured" and spec.vib_widths == "learned":
        raise PrunetuneError("split 'measured' tries every KV-group count; widths 'learned' takes it from the gates: "
                             "choose one")
    if spec.split == "measured" and compensate:
        raise PrunetuneError("split 'measured' scores each split with the gates in eval, which do not apply FLAP's "
                             "compensation: use center (the default) instead of compensate")
    if spec.vib_center and compensate:
        raise PrunetuneError("vib center already leaves a removed structure at its mean (its own compensation): "
                             "use center or compensate, not both")


class VibMethod(Method):
    """The VIB lifecycle: `prepare` adds gates (hooks, weights frozen), `extra_loss` = KL + Lagrangian,
    `after_step` steps the gates and (ascending) the multipliers, `finalize` folds μ and shrinks.

    The gates and multipliers are the method's own parameters with their own optimizers: the model's
    weights stay frozen, and a LoRA trainer driving this method would not move them with its learning rate.
    """

    name = "vib"

    def __init__(self, spec: StructuredSpec | None = None, *, seed: int = 0, beta: float = 1.0,
                 straight_through: bool = True, antithetic: bool = False, optimizer: str = "adam",
                 lr_decay: float = 1.0, constraint: str = "global", compensate: bool = False) -> None:
        """`spec`: the recipe's `structured` section, VIB's one schema (TVA-Prune's names: TARGET_SPARSITY is
        `sparsity`, VIB_LR `vib_lr`, ...; None: its defaults). The keyword options are the method's own knobs,
        which no recipe sets: `beta` sharpens the soft keep-probability sigmoid(−β·log α); `straight_through`
        constrains the thresholded sparsity (value) with the expected one's gradient; `antithetic` pairs every
        example with the negated noise; `optimizer` "adam" or "nsgd" for the gates; `lr_decay` the fraction the
        gate lr decays to after the warm-up (1 = constant); `constraint` "global" or "per_layer"; `compensate`
        FLAP's bias compensation of removed structures (applied by `methods.shrink.prune_structured`); `seed`
        the gates' init and noise."""
        self.spec = spec if spec is not None else StructuredSpec()
        check_options(self.spec, optimizer=optimizer, constraint=constraint, lr_decay=lr_decay, beta=beta,
                      compensate=compensate)
        self.structures = parse_structures(self.spec.structures)
        self.seed, self.beta, self.straight_through, self.antithetic = seed, beta, straight_through, antithetic
        self.optimizer, self.lr_decay, self.constraint, self.compensate = optimizer, lr_decay, constraint, compensate
        self.gates: VibGates | None = None
        self.lambdas = nn.Parameter(torch.zeros(2))
        self._hooks: list = []
        self._z_hidden: torch.Tensor | None = None
        self.bypass = False  # hooks pass through: the model computes as the dense model (teacher for "kd")
        self._frozen: list[nn.Parameter] = []
        self.history: list[dict] = []
        self.total_steps = self.spec.vib_steps
        self.step = 0
        self._opt: torch.optim.Optimizer | None = None
        self._lag_opt: torch.optim.Optimizer | None = None
        self.means: dict[str, torch.Tensor] | None = None  # center: o_proj / down_proj input means [layers, n]
        self._layer_targets: dict[str, tuple[float, torch.Tensor]] | None = None  # constraint "per_layer"
        self._gaps = torch.zeros(1)  # the last step's constraint gaps (lagrangian_step "gap")

    # -- lifecycle -----------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, ctx: MethodContext | None = None) -> nn.Module:
        if hasattr(model, "peft_config"):
            raise PrunetuneError("vib trains only its gates with the model's weights frozen: fine-tune it without "
                                 "LoRA (lora off), then recover the shrunk model with LoRA")
        geom = geometry(model)
        if self.spec.vib_center and self.means is None:
            raise PrunetuneError("vib center needs the calibration means of the o_proj / down_proj inputs: call "
                                 "set_means(model, collect_moments(...)) first (prune_structured does)")
        if "hidden" in self.structures and get_adapter(model).family != "llama":
            raise PrunetuneError("hidden-dimension gates need a family with hidden-dimension coupling (Llama)")
        device = next(model.parameters()).device
        self.gates = VibGates(geom, self.structures, self.spec.init_log_sigma2, self.seed).to(device)
        self._layer_targets = self._per_layer_targets(geom) if self.constraint == "per_layer" else None
        shape = (2,) if self._layer_targets is None else (sum(w.numel() for _, w in self._layer_targets.values()), 2)
        self.lambdas = nn.Parameter(torch.zeros(shape, device=device))  # (λ₁, λ₂), per (kind, layer) if per-layer
        for p in model.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                self._frozen.append(p)
        self._install(model)
        mu_lr = self.spec.vib_lr if self.spec.vib_mu_lr is None else self.spec.vib_mu_lr
        banks = list(self.gates.banks.values())
        groups = [{"params": [b.log_sigma2 for b in banks], "lr": self.spec.vib_lr},
                  {"params": [b.mu for b in banks], "lr": mu_lr}]
        # lagrangian_step "gap": no momentum on the gates either, so they stop crossing when the push reverses
        betas = (0.0, 0.999) if self.spec.lagrangian_step == "gap" else (0.9, 0.999)
        self._opt = (torch.optim.Adam(groups, betas=betas) if self.optimizer == "adam" else torch.optim.SGD(groups))
        for b in banks:
            b.antithetic = self.antithetic
        self._lag_opt = torch.optim.Adam([self.lambdas], lr=self.spec.lagrangian_lr)
        self._base_lrs = [g["lr"] for g in self._opt.param_groups]
        if ctx is not None and ctx.max_steps:
            self.total_steps = ctx.max_steps
        return model

    def _install(self, model: nn.Module) -> None:
        adapter = get_adapter(model)
        root = unwrap(model)
        geom = self.gates.geom
        banks = self.gates.banks
        qchunk = geom.groups * geom.head_dim
        device = next(root.parameters()).device

        def outer(lin: nn.Module) -> nn.Module:
            return root.get_submodule(adapter.name_of(lin).removesuffix(".base_layer"))

        def scale_in(bank: GateBank, layer: int, chunk: int, kind: str):
            means = None if self.means is None else self.means[kind][layer].to(device)

            def hook(_m, args):
                if self.bypass:
                    return None
                x = args[0]
                z = bank.z(x.shape[0], layer).to(x.dtype)  # [B or 1, n]
                shape = (z.shape[0],) + (1,) * (x.dim() - 2) + (z.shape[1], 1)
                xs = x.unflatten(-1, (z.shape[1], chunk))
                if means is None:
                    y = (xs * z.view(shape)).flatten(-2)
                else:  # centred: m + z·(x − m); z = 0 leaves the structure's mean
                    m = means.to(x.dtype).view(z.shape[1], chunk)
                    y = (m + (xs - m) * z.view(shape)).flatten(-2)
                return (y, *args[1:])
            return hook

        def scale_out_hidden(_m, _args, out):
            z = self._z_hidden
            if z is None:
                return out
            return out * z.view(z.shape[0], *([1] * (out.dim() - 2)), z.shape[-1]).to(out.dtype)

        def sample_hidden(_m, args, out):
            self._z_hidden = None if self.bypass else banks["hidden"].z(out.shape[0])
            return scale_out_hidden(_m, args, out)

        for l, block in enumerate(adapter.blocks()):
            if "heads" in banks:
                self._hooks.append(outer(block.linears["o"]).register_forward_pre_hook(scale_in(banks["heads"], l, qchunk, "heads")))
            if "neurons" in banks:
                self._hooks.append(outer(block.linears["down"]).register_forward_pre_hook(scale_in(banks["neurons"], l, 1, "neurons")))
            if "hidden" in banks:
                for r in ("o", "down"):
                    self._hooks.append(outer(block.linears[r]).register_forward_hook(scale_out_hidden))
        if "hidden" in banks:
            self._hooks.append(root.get_input_embeddings().register_forward_hook(sample_hidden))

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._z_hidden = None

    def ramp(self, step: int) -> float:
        """Fraction of the target in force at `step` (LAGRANGIAN_WARMUP: linear from 0, then 1)."""
        warm = self.spec.lagrangian_warmup * self.total_steps
        return min(1.0, step / warm) if warm > 0 else 1.0

    def target_at(self, step: int) -> float:
        return self.spec.sparsity * self.ramp(step)

    def _per_layer_targets(self, geom: Geometry) -> dict[str, tuple[float, torch.Tensor]]:
        """Per gated kind: the removed fraction the uniform widths leave in every layer, and each constraint's
        weight = the share of (ATT_MUL-weighted) block parameters it governs, so that one multiplier moves a
        gate as far as the global constraint's would: the same multiplier lr serves both."""
        w = allocate_widths(geom, self.spec.sparsity, self.structures, self.spec.round_to)
        dense = geom.layers * (self.spec.att_mul * geom.attn_params(geom.kv_heads, geom.hidden)
                               + geom.mlp_params(geom.inter, geom.hidden))
        out = {}
        for kind, kept, n, params in (
                ("heads", w.kv, geom.kv_heads, self.spec.att_mul * geom.attn_params(geom.kv_heads, geom.hidden)),
                ("neurons", w.neurons, geom.inter, geom.mlp_params(geom.inter, geom.hidden))):
            if kind in self.structures:
                out[kind] = (1.0 - kept / n, torch.full((geom.layers,), params / dense))
        if "hidden" in self.structures:
            out["hidden"] = (1.0 - w.hidden / geom.hidden, torch.ones(1))
        return out

    def _per_layer_lagrangian(self, step: int) -> torch.Tensor:
        """Σ weight·(λ₁·gap + λ₂·gap²) over every (kind, layer): gap = removed fraction of that layer's gates
        (thresholded value, expected gradient) − its uniform target, ramped like the global one."""
        assert self.gates is not None and self._layer_targets is not None
        soft, hard = self.gates.soft(self.beta), self.gates.hard()
        lag, i, gaps = self.lambdas.new_zeros(()), 0, []
        for kind, (target, weight) in self._layer_targets.items():
            expected = 1.0 - soft[kind].mean(-1).reshape(-1)
            thresholded = 1.0 - hard[kind].mean(-1).reshape(-1)
            r = thresholded + (expected - expected.detach()) if self.straight_through else expected
            gap = r - target * self.ramp(step)
            lam = self.lambdas[i:i + gap.numel()]
            lag = lag + (weight.to(gap.device) * (lam[:, 0] * gap + lam[:, 1] * gap * gap)).sum()
            i += gap.numel()
            gaps.append(gap.detach())
        self._gaps = torch.cat(gaps)
        return lag

    def budget_scale(self) -> float:
        """Gate lr factor for the budget: vib_lr_steps / steps when training runs longer than the lr was set for.

        Adam moves each gate by about lr per step whatever the size of its gradient, so at a constant lr a longer
        run is a longer walk, and with 2 x 256 tokens a step most of each gate's gradient is noise. On SmolLM2 at
        50% (pure VIB, μ lr = lr, gap rule; 16 test windows) 64 steps at lr 0.2 gave ppl 1,044 against 230 for
        16 steps; 64 steps at 0.05, the same travel in all, gave 129 (BENCHMARKS.md, VIB gate budget)."""
        ref = self.spec.vib_lr_steps
        return 1.0 if ref is None else min(1.0, ref / max(1, self.total_steps))

    def lr_scale(self, step: int) -> float:
        """Gate lr factor: the budget's (`budget_scale`), times 1 while the target ramps up, then linear to
        `lr_decay` at the last step, so the gates settle where the multipliers put the thresholded count instead
        of oscillating around it."""
        warm = self.spec.lagrangian_warmup * self.total_steps
        if step < warm or self.total_steps <= warm:
            return self.budget_scale()
        frac = (step - warm) / max(1.0, self.total_steps - 1 - warm)
        return self.budget_scale() * (1.0 - (1.0 - self.lr_decay) * min(1.0, frac))

    def extra_loss(self, model: nn.Module, inputs: dict | None, outputs, ctx: MethodContext | None = None):
        assert self.gates is not None
        step = ctx.step if ctx is not None else self.step
        kl = self.gates.kl()
        expected = 1.0 - self.gates.kept_fraction(self.gates.soft(self.beta), self.spec.att_mul)
        with torch.no_grad():
            hard = 1.0 - self.gates.kept_fraction(self.gates.hard(), self.spec.att_mul)
        # the value is what thresholding removes, the gradient the expected count's (straight-through)
        s = hard + (expected - expected.detach()) if self.straight_through else expected
        t = self.target_at(step)
        if self._layer_targets is None:
            gap = s - t
            lag = self.lambdas[0] * gap + self.lambdas[1] * gap * gap
            self._gaps = gap.detach().reshape(1)
        else:
            lag = self._per_layer_lagrangian(step)
        lam = self.lambdas.detach().reshape(-1, 2).mean(0)  # per-layer: the mean multiplier
        logs = {"kl": float(kl.detach()), "expected_sparsity": float(expected.detach()),
                "thresholded_sparsity": float(hard),
                "target": t, "lambda1": float(lam[0]), "lambda2": float(lam[1])}
        return self.spec.kl_factor * kl + lag, logs

    def after_step(self, model: nn.Module, ctx: MethodContext | None = None) -> None:
        assert self._opt is not None and self._lag_opt is not None
        if self.lambdas.grad is not None:
            self.lambdas.grad.neg_()  # ascent on the multipliers
        if self.optimizer == "nsgd":  # keep each gate's gradient size relative to its kind's: the score
            for group in self._opt.param_groups:  # accumulates the mean gradient, not its sign (Adam would)
                for p in group["params"]:
                    if p.grad is not None:  # a spike on one of 46k neurons can be ~200 RMS: clipped at
                        p.grad.div_(p.grad.pow(2).mean().sqrt().clamp_min(1e-30)).clamp_(-NSGD_CLIP, NSGD_CLIP)
        scale = self.lr_scale(self.step)
        for group, lr in zip(self._opt.param_groups, self._base_lrs):
            group["lr"] = lr * scale
        self._opt.step()
        if self.spec.lagrangian_step == "adam":
            self._lag_opt.step()
        else:
            self._gap_step()
        self._opt.zero_grad(set_to_none=True)
        self._lag_opt.zero_grad(set_to_none=True)
        self.step += 1

    @torch.no_grad()
    def _gap_step(self) -> None:
        """lagrangian_step "gap": plain ascent, λ += lr·∂L/∂λ / sparsity, so a multiplier moves by lr at a gap of
        the whole target and less as the kept count closes in (Adam moves it by lr whatever the gap: at 3x and 4x
        the 16-step budget the multipliers built up while the gates lagged and overshot, 46-72% of block
        parameters past the threshold for a 30-50% target). Anti-windup: λ₁ never pushes away from the target;
        it is set to 0 where its sign and the gap's disagree (the gates already past it come back under λ₂'s
        quadratic term alone, whose force is proportional to the gap). The gates' Adam runs without momentum in
        this mode (β₁ = 0): with it, gates kept crossing for several steps after the push reversed."""
        grad = self.lambdas.grad
        if grad is None:
            return
        if self._layer_targets is not None:  # per-layer: each row's gradient carries its weight (share of block
            # parameters, ~1/layers); divided out, every layer's multiplier moves as the global one would
            weights = torch.cat([w for _, w in self._layer_targets.values()]).to(grad.device)
            grad = grad / weights[:, None]
        self.lambdas.sub_(grad, alpha=self.spec.lagrangian_lr / max(self.spec.sparsity, 1e-3))  # grad is negated
        lam1 = self.lambdas.view(-1, 2)[:, 0]
        lam1[lam1 * self._gaps.to(lam1.device) < 0] = 0.0

    def finalize(self, model: nn.Module, ctx: MethodContext | None = None) -> nn.Module:
        geom = geometry(model)
        sel = select(self.scores(), self.widths(geom), geom)
        self.fold(model, sel)
        return shrink_selection(model, sel, self.structures)

    def summary(self) -> dict:
        out: dict = {"config": self.record(), "steps_done": self.step}
        if self.gates is not None:
            hard = self.gates.hard()
            out["thresholded_sparsity"] = 1.0 - float(self.gates.kept_fraction(hard, self.spec.att_mul))
            out["kept"] = {k: (v.sum(-1).tolist() if v.dim() > 1 else int(v.sum())) for k, v in hard.items()}
            out["mu"] = {k: {"mean": float(b.mu.detach().mean()), "min": float(b.mu.detach().min()),
                                 "max": float(b.mu.detach().max())}
                         for k, b in self.gates.banks.items()}
        if self.history:
            out["last"] = self.history[-1]
        return out

    def record(self) -> dict:
        """The settings a result records (`summary()["config"]`, the fine-tuning manifest's `vib`): the spec's
        VIB options and the method's own, under the names results have always had (TVA-Prune's where it has
        them: `target_sparsity`, `steps`, `batch_size`, ...), so old and new results compare key by key."""
        sp = self.spec
        return {"target_sparsity": sp.sparsity, "vib_lr": sp.vib_lr, "mu_lr": sp.vib_mu_lr,
                "lr_steps": sp.vib_lr_steps, "lagrangian_lr": sp.lagrangian_lr, "lagrangian_step": sp.lagrangian_step,
                "lagrangian_warmup": sp.lagrangian_warmup, "att_mul": sp.att_mul,
                "kl_factor": sp.kl_factor, "beta": self.beta, "straight_through": self.straight_through,
                "structures": list(self.structures), "round_to": sp.round_to, "steps": sp.vib_steps,
                "batch_size": sp.vib_batch, "init_log_sigma2": sp.init_log_sigma2, "antithetic": self.antithetic,
                "optimizer": self.optimizer, "widths": sp.vib_widths, "compensate": self.compensate,
                "center": sp.vib_center, "lr_decay": self.lr_decay, "constraint": self.constraint,
                "neuron_ranking": sp.neuron_ranking(), "loss": sp.vib_loss, "split": sp.split, "seed": self.seed}

    def to_dict(self) -> dict:
        return {"name": self.name, **self.record()}

    # -- selection and fold ------------------------------------------------------------------------
    def scores(self) -> dict[str, torch.Tensor]:
        """Importance = −(log σ² − log μ²): the more signal over noise, the more important."""
        assert self.gates is not None
        return {k: -b.log_alpha().detach().cpu() for k, b in self.gates.banks.items()}

    def learned_widths(self) -> dict[str, float]:
        """Mean thresholded kept count per layer of each gated structure (before uniformity and rounding)."""
        assert self.gates is not None
        return {k: float(v.sum(-1).float().mean()) for k, v in self.gates.hard().items()}

    def widths(self, geom: Geometry) -> Widths:
        """Uniform widths at the target: VIB's learned KV groups and hidden width, rounded; neurons fill the
        exact parameter budget (so VIB and the baselines keep the same number of parameters)."""
        if self.spec.vib_widths == "uniform":
            return allocate_widths(geom, self.spec.sparsity, self.structures, self.spec.round_to)
        learned = self.learned_widths()
        hint = Widths(round(learned.get("heads", geom.kv_heads)), geom.inter, round(learned.get("hidden", geom.hidden)))
        return allocate_widths(geom, self.spec.sparsity, self.structures, self.spec.round_to, hint=hint)

    def set_means(self, model: nn.Module, stats: dict) -> None:
        """Calibration means of every o_proj / down_proj input (`collect_moments` of the dense model), for
        `center`: the gates then scale each structure's deviation from its mean, so training sees what removal
        with FLAP's compensation does (the structure's mean stays), and the fold turns the means into biases."""
        adapter = get_adapter(model)
        blocks = adapter.blocks()
        self.means = {kind: torch.stack([stats[adapter.name_of(b.linears[role])].mean().float() for b in blocks])
                      for kind, role in (("heads", "o"), ("neurons", "down"))}

    @torch.no_grad()
    def fold(self, model: nn.Module, sel: Selection) -> None:
        """Fold each kept gate's μ into the weights it scales and drop the hooks.

        Removed structures are not touched here: `shrink` drops them (or `apply_masks` zeroes them). With
        `center`, the means become biases: a removed structure leaves W·m (FLAP's compensation), a kept one
        adds W·(1 − μ)·m to its scaled weights.
        """
        assert self.gates is not None
        self.remove_hooks()
        adapter = get_adapter(model)
        root = unwrap(model)
        geom = self.gates.geom
        banks = self.gates.banks
        qchunk = geom.groups * geom.head_dim
        blocks = adapter.blocks()
        if self.means is not None:
            ensure_biases(model)
        for l, block in enumerate(blocks):
            for kind, role, idx, chunk in (("heads", "o", sel.kv, qchunk), ("neurons", "down", sel.neurons, 1)):
                if kind not in banks:
                    continue
                lin = block.linears[role]
                mu = banks[kind].mu[l].detach()
                if self.means is not None:  # W(m + μ·keep·(x − m)) = (μ·keep ⊙ W) x + W((1 − μ·keep) ⊙ m)
                    keep = torch.zeros_like(mu)
                    keep[idx[l].to(keep.device)] = 1.0
                    rest = ((1 - mu * keep).repeat_interleave(chunk) * self.means[kind][l].to(mu.device)).double()
                    lin.bias += (lin.weight.double() @ rest).to(lin.bias.dtype)
                lin.weight.mul_(mu.repeat_interleave(chunk)[None, :].to(lin.weight.dtype))
        if "hidden" in banks:
            mu = banks["hidden"].mu.detach()
            safe = torch.where(mu.abs() > EPS, mu, torch.full_like(mu, EPS))
            emb = root.get_input_embeddings()
            emb.weight.mul_(mu[None, :].to(emb.weight.dtype))
            for block in blocks:
                for r in ("o", "down"):
                    lin = block.linears[r]
                    lin.weight.mul_(mu[:, None].to(lin.weight.dtype))
                    if lin.bias is not None:
                        lin.bias.mul_(mu.to(lin.bias.dtype))
            head = root.get_output_embeddings()
            if head is not None and head.weight is emb.weight:
                norm = root.base_model.norm  # the final RMSNorm feeding the (tied) LM head
                norm.weight.div_(safe.to(norm.weight.dtype))
            # an untied head keeps its weights: the residual stream it reads is unchanged by the fold
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen.clear()

    def set_eval_keep(self, sel: Selection) -> None:
        """Make eval-mode gates keep exactly `sel` (z = μ there, 0 elsewhere): the model `fold` reproduces."""
        assert self.gates is not None
        geom = self.gates.geom
        for kind, idx, n in (("heads", sel.kv, geom.kv_heads), ("neurons", sel.neurons, geom.inter),
                             ("hidden", sel.hidden, geom.hidden)):
            if kind in self.gates.banks:
                keep = torch.zeros(idx.shape[:-1] + (n,), dtype=torch.bool)
                keep.scatter_(-1, idx, True)
                self.gates.banks[kind].keep_override = keep.to(self.gates.banks[kind].mu.device)

    def clear_eval_keep(self) -> None:
        """Back to the gates' own thresholded keep set (after a measured split tried its selections)."""
        assert self.gates is not None
        for bank in self.gates.banks.values():
            bank.keep_override = None
