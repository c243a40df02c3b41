"""The recipe's `structured` section (`prunetune shrink`): VIB's options with TVA-Prune's names, and the width
rule and calibration that VIB and the structure criteria it is compared with (l1, l2, wanda, flap;
`methods.shrink`) share. It lives with VIB, whose options are most of it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from prunetune.schema import Spec


class StructuredSpec(Spec):
    """Structured pruning that shrinks the model (`prunetune.methods.shrink`, `pruning.shrink`, `methods.vib`).

    The VIB options keep TVA-Prune's names: TARGET_SPARSITY is `sparsity`, VIB_LR `vib_lr`,
    LAGRANGIAN_WARMUP `lagrangian_warmup`, ATT_MUL `att_mul`. The gate-training budget is
    `vib_steps` x `vib_batch` x `seqlen` tokens, recorded with every result. It is the one schema of VIB's
    options: `VibMethod(spec)` takes it (library callers too); what no recipe sets is a keyword argument there.
    """

    method: Literal["vib", "l1", "l2", "wanda", "flap"] = "vib"
    sparsity: float = Field(0.3, ge=0.0, lt=1.0, description="fraction of block parameters removed")
    structures: list[Literal["heads", "neurons", "hidden"]] = Field(
        default_factory=lambda: ["heads", "neurons"], description="KV groups, MLP neurons, hidden channels")
    round_to: int = Field(64, ge=1, description="kept neuron / hidden widths are multiples of this")
    split: Literal["equal", "measured"] = Field(
        "equal", description="how the budget is split between KV groups and MLP neurons: equal (every kind keeps "
        "the same fraction) or measured (each whole KV-group count, the neurons taking the rest, is tried on the "
        "calibration windows and the lowest LM loss wins; the method's own scores rank inside each kind)")
    nsamples: int = Field(16, ge=1, description="calibration windows (Wanda/FLAP statistics, VIB training text)")
    seqlen: int = Field(256, ge=2)
    vib_steps: int = Field(16, ge=1, description="gate-training steps")
    vib_batch: int = Field(2, ge=1, description="windows per gate-training step")
    vib_lr: float = Field(0.2, gt=0, description="VIB_LR: Adam learning rate of the gates' log sigma^2")
    vib_mu_lr: float | None = Field(0.01, gt=0, description="learning rate of the gates' mu (small: mu stays near 1 "
                                    "for the fold, best at 16 steps with the hybrid; at 4x the steps pure VIB measured "
                                    "best with it equal to vib_lr, where a pruned gate can shrink mu rather than only "
                                    "raise sigma); None = vib_lr")
    vib_lr_steps: int | None = Field(
        16, ge=1, description="the step count vib_lr and vib_mu_lr are set for: with more steps each step's lr is "
        "scaled by vib_lr_steps / vib_steps, so the gates travel as far in all and the extra steps average their noise "
        "(Adam moves a gate about lr per step whatever its gradient; at a constant lr, 4x the steps was 4x the "
        "travel and a worse selection); None = the same lr at any budget")
    vib_loss: Literal["kd", "lm"] = Field("kd", description="gate objective: KL to the dense model, or the LM loss")
    vib_widths: Literal["uniform", "learned"] = Field(
        "uniform", description="uniform: the baselines' width rule; learned: KV groups from VIB's thresholding")
    lagrangian_lr: float = Field(10.0, gt=0, description="learning rate of the Lagrange multipliers (ascent); at a "
                                 "16-step budget a fast one is what pushes the gates to the threshold")
    lagrangian_step: Literal["adam", "gap"] = Field(
        "adam", description="how the Lagrange multipliers ascend: adam (TVA-Prune's: an Adam step of lagrangian_lr "
        "whatever the gap) or gap (a step of lagrangian_lr x gap / sparsity, which shrinks as the kept count "
        "reaches the target, lambda1 set to 0 when it would push past the target, and no momentum on the gates' Adam)")
    lagrangian_warmup: float = Field(0.3, ge=0.0, le=1.0, description="LAGRANGIAN_WARMUP: fraction of steps the target ramps over")
    att_mul: float = Field(1.0, gt=0, description="ATT_MUL: weight of attention parameters in the sparsity count")
    kl_factor: float = Field(1e-6, ge=0, description="weight of the summed VIBNet KL term")
    init_log_sigma2: float = Field(-2.0, description="initial log sigma^2 of the gates (short budgets start nearer 0)")
    vib_center: bool = Field(True, description="gates scale each head/neuron's deviation from its calibration mean: "
                                                "a removed structure leaves its mean as a bias (FLAP's removal)")
    vib_neuron_ranking: Literal["auto", "vib", "flap"] = Field(
        "auto", description="vib: the gates rank KV groups and neurons; flap: the gates rank KV groups, FLAP's "
                            "fluctuation ranks neurons (the hybrid; needs vib_center); auto: flap with centred "
                            "gates (below every baseline at 20/30/50% on SmolLM2, pure VIB is not at 50%), vib without")

    def neuron_ranking(self) -> str:
        """What ranks the neurons: `vib_neuron_ranking` with auto resolved (flap when the gates are centred)."""
        if self.vib_neuron_ranking == "auto":
            return "flap" if self.vib_center else "vib"
        return self.vib_neuron_ranking
