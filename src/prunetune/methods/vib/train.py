"""The standalone gate-training loop: VIB's gates trained on calibration windows with the model frozen."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.methods.vib.method import VibMethod
from prunetune.models.arch import unwrap
from prunetune.pruning.shrink.scores import collect_moments


def train_gates(model: nn.Module, method: VibMethod, ids: torch.Tensor, *, log_every: int = 0,
                log=None) -> VibMethod:
    """The standalone gate-training loop on calibration windows `ids` [n, seqlen]: `vib_steps` steps of
    `vib_batch` windows (cycled) of the method's spec, its loss (KL to the dense model or LM) + KL + Lagrangian,
    model weights frozen."""
    spec = method.spec
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise PrunetuneError(f"gate training needs token windows [n, seqlen >= 2], got {tuple(ids.shape)}")
    if spec.vib_center and method.means is None:  # centred gates: the dense model's means, from the same text
        method.set_means(model, collect_moments(model, ids[:8]))
    method.prepare(model)
    root = unwrap(model)
    was_training = root.training
    root.eval()  # dropout off: the only noise is the gates'
    method.gates.train()
    device = next(root.parameters()).device
    gen = torch.Generator().manual_seed(method.seed)
    order = torch.randperm(ids.shape[0], generator=gen)
    t0 = time.perf_counter()
    rng = torch.random.fork_rng(devices=[])  # the gates' noise is seeded: a run is reproducible
    rng.__enter__()
    torch.manual_seed(method.seed)
    try:
        for step in range(spec.vib_steps):
            pick = order[(torch.arange(spec.vib_batch) + step * spec.vib_batch) % ids.shape[0]]
            batch = ids[pick].to(device)
            if method.antithetic:  # the same windows again under the negated gate noise
                batch = torch.cat([batch, batch])
            if spec.vib_loss == "kd":
                with torch.no_grad():
                    method.bypass = True
                    try:
                        teacher = F.log_softmax(root(input_ids=batch).logits.float(), -1)
                    finally:
                        method.bypass = False
                out = root(input_ids=batch)
                task = F.kl_div(F.log_softmax(out.logits.float(), -1).flatten(0, 1), teacher.flatten(0, 1),
                                log_target=True, reduction="batchmean")
                del teacher
            else:
                out = root(input_ids=batch, labels=batch)
                task = out.loss
            extra, logs = method.extra_loss(model, None, out)
            loss = task + extra
            loss.backward()
            method.after_step(model)
            logs.update({"step": step + 1, f"{spec.vib_loss}_loss": float(task.detach()), "seconds": time.perf_counter() - t0})
            method.history.append(logs)
            if log is not None and log_every and (step + 1) % log_every == 0:
                log(logs)
    finally:
        rng.__exit__(None, None, None)
        method.gates.eval()
        root.train(was_training)
    method.history[-1]["tokens"] = spec.vib_steps * spec.vib_batch * ids.shape[1]
    return method
