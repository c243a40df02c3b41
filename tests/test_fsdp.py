"""Fine-tuning under FSDP2 (`accelerate launch --config_file configs/accelerate/fsdp.yaml`) keeps masks exact.

FSDP2 shards every weight across the ranks as a DTensor; masks must be enforced on each rank's shard after
every optimizer step, and the export must be the gathered full model with the pruned zeros intact.

accelerate turns an FSDP launch into FSDP only on accelerators: on CPU processes it silently runs data
parallel (`AcceleratorState` switches to FSDP for MULTI_GPU-like types, not MULTI_CPU). torch's FSDP2
itself runs on CPU with gloo, so the CPU tests launch the shipped config through `accelerate launch` with a
worker that lifts only that one gate (`_CPU_FSDP`); everything else (the Trainer's FSDP2 preparation,
sharding per decoder block, RAM-efficient loading from rank 0, the full-state-dict gathering) is the real
code. The `gpu` test runs the same launch with stock accelerate on the GPUs there are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import cli_ok
from prunetune.pruning.masks import MaskSet
from prunetune.tuning.callbacks import masks_digest

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp.yaml"
ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# 16 texts / (2 ranks x batch 4) = 2 steps per epoch, 3 epochs
STEPS = 6

#: runs the CLI with accelerate's FSDP on CPU processes: the one change is the distributed type accelerate
#: picks (FSDP instead of MULTI_CPU when the launch carries an FSDP plugin)
_CPU_FSDP = """
import runpy, sys
import accelerate.state as st
from accelerate.utils import DistributedType

_init = st.AcceleratorState.__init__
def init(self, *a, **kw):
    _init(self, *a, **kw)
    if self.distributed_type == DistributedType.MULTI_CPU and kw.get("fsdp_plugin") is not None:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = kw["fsdp_plugin"]
        st.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
st.AcceleratorState.__init__ = init
sys.argv = ["prunetune", *sys.argv[1:]]
runpy.run_module("prunetune.cli", run_name="__main__")
"""


#: prepended to `_CPU_FSDP`: rank 1 SIGKILLs itself at the end of optimizer step $KILL_AT, as a crash would
_KILL_RANK1 = """
import os, signal
from transformers import TrainerCallback
import prunetune.tuning.kd_trainer as kt

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == int(os.environ["KILL_AT"]) and os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGKILL)

_kd_init = kt.KDTrainer.__init__
def kd_init(self, *a, **kw):
    _kd_init(self, *a, **kw)
    self.add_callback(Kill())
kt.KDTrainer.__init__ = kd_init
"""


def _exe(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    if not exe.exists():
        pytest.fail(f"{name} not found next to the python executable")
    return str(exe)


def _launch(cmd: list[str], ok: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PRUNETUNE_PROGRESS": "0", "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if ok:
        assert p.returncode == 0, p.stderr[-4000:]
    return p


def _ft_args(pruned: Path, text: Path, mode: str, out: Path) -> list[str]:
    return ["finetune", str(pruned), f"--{mode}", "--lr", "0.01", "--task", str(text), "--task-type", "causal-lm",
            "--n-samples", "16", "--epochs", "3", "--batch-size", "4", "--max-length", "32", "--eval-samples", "8",
            "--test-samples", "8", "--no-retention", "--no-kd", "--out", str(out)]


def _run(launch: list[str], pruned: Path, text: Path, mode: str, out: Path) -> Path:
    _launch([*launch, *_ft_args(pruned, text, mode, out)])
    return out


def _accelerate_fsdp(nproc: int, *script: str) -> list[str]:
    return [_exe("accelerate"), "launch", "--config_file", str(CONFIG), "--num_processes", str(nproc), *script]


@pytest.fixture()
def pruned(tmp_path, capsys) -> Path:
    """tiny-llama with 50% magnitude pruning (per row), a plain HF dir with its masks."""
    d = tmp_path / "pruned"
    cli_ok(["prune", "tiny-llama", "--method", "magnitude", "--sparsity", "0.5", "--out", str(d)], capsys)
    return d / "model"


@pytest.fixture()
def text(tmp_path, wikitext_dir) -> Path:
    t = tmp_path / "train.txt"
    t.write_text((wikitext_dir / "valid.txt").read_text()[:40_000])
    return t


def _losses(out: Path) -> tuple[list[float], list[float]]:
    """(training losses, evaluation losses) in the order logged."""
    rows = [json.loads(ln) for ln in next((out / "stages").glob("01-*")).joinpath("tune", "train_log.jsonl")
            .read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r]


def _check_fsdp_run(out: Path, pruned: Path, nproc: int) -> dict[str, torch.Tensor]:
    """Both ranks ended with the input's masks after every step; the loss fell; the export, reloaded by plain
    transformers, has exactly the pruned zeros while its kept weights trained. Returns the exported weights."""
    want = MaskSet.load(pruned)
    tune = next((out / "stages").glob("01-*")) / "tune"
    ranks = [json.loads((tune / f"rank{r}.json").read_text()) for r in range(nproc)]
    assert {r["masks_digest"] for r in ranks} == {masks_digest(want)}
    assert {r["global_step"] for r in ranks} == {STEPS * 2 // nproc}
    m = json.loads((out / "metrics.json").read_text())
    assert m["fsdp"] is True and m["world_size"] == nproc and m["sparsity"] == 0.5
    train, evals = _losses(out)
    assert train[-1] < train[0] and evals[-1] < evals[0], (train, evals)

    from transformers import AutoModelForCausalLM

    before = load_file(pruned / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    checked = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ROLES:
            w = mod.weight.detach()
            assert torch.equal(w == 0, ~want[name]), name  # zeros exactly where the pruning put them
            assert not torch.equal(w, before[f"{name}.weight"]), name  # and the kept weights trained
            checked += 1
    assert checked == 2 * len(ROLES)  # tiny-llama: 2 blocks
    assert MaskSet.load(out / "model").sparsity() == 0.5
    return load_file(out / "model" / "model.safetensors")


@pytest.mark.slow
def test_fsdp2_full_finetune_on_two_cpu_processes_equals_ddp_and_resumes(tmp_path, pruned, text):
    """Full fine-tuning (AdamW moves every weight that has a gradient: the zeros hold only because each rank
    re-zeroes its shard after every step) under FSDP2, then the same under DDP (torchrun): the exported
    weights agree to float rounding, so sharding changed nothing but where the weights lived. A run killed
    mid-way and resumed with --resume ends with the uninterrupted run's weights, bit for bit."""
    worker = tmp_path / "cpu_fsdp.py"
    worker.write_text(_CPU_FSDP)
    fsdp = _check_fsdp_run(_run(_accelerate_fsdp(2, str(worker)), pruned, text, "full", tmp_path / "fsdp"),
                           pruned, 2)
    ddp_out = tmp_path / "ddp"
    _launch([_exe("torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "prunetune.cli",
             *_ft_args(pruned, text, "full", ddp_out)])
    ddp = load_file(ddp_out / "model" / "model.safetensors")
    assert set(fsdp) == set(ddp)
    assert max(float((fsdp[k] - ddp[k]).abs().max()) for k in fsdp) < 1e-5
    assert _losses(tmp_path / "fsdp")[1] == pytest.approx(_losses(ddp_out)[1], rel=1e-5)

    # killed on rank 1 after step 3, resumed from the epoch-end checkpoint-2 (the Trainer's FSDP checkpoint)
    killer = tmp_path / "kill_fsdp.py"
    killer.write_text(_KILL_RANK1 + _CPU_FSDP)
    cut = tmp_path / "cut"
    p = _launch([*_accelerate_fsdp(2, str(killer)), *_ft_args(pruned, text, "full", cut)], ok=False,
                env={"KILL_AT": "3"})
    assert p.returncode != 0 and not (cut / "model").exists()
    p = _launch([*_accelerate_fsdp(2, str(worker)), *_ft_args(pruned, text, "full", cut), "--resume"])
    assert "resuming the interrupted stage from checkpoint-2" in p.stdout
    resumed = _check_fsdp_run(cut, pruned, 2)
    assert all(torch.equal(resumed[k], fsdp[k]) for k in fsdp)  # as if never interrupted


@pytest.mark.slow
def test_fsdp2_lora_on_two_cpu_processes_merges_with_exact_zeros(tmp_path, pruned, text):
    """LoRA under FSDP2: the adapters train sharded, rank 0 gathers the model and exports (W + s*BA) * M."""
    worker = tmp_path / "cpu_fsdp.py"
    worker.write_text(_CPU_FSDP)
    out = _run(_accelerate_fsdp(2, str(worker)), pruned, text, "lora", tmp_path / "lora")
    _check_fsdp_run(out, pruned, 2)
    assert json.loads((out / "manifest.json").read_text())["config"]["tune"]["mode"] == "lora"


@pytest.mark.slow
def test_fsdp_launch_on_cpu_with_stock_accelerate_stops_in_one_line(tmp_path, pruned, text):
    """Stock accelerate runs the FSDP config as MULTI_CPU data parallel on CPU: each rank says so and stops,
    instead of failing on the weightless models of the ranks other than 0."""
    p = _launch([*_accelerate_fsdp(2, "-m", "prunetune.cli"), *_ft_args(pruned, text, "full", tmp_path / "x")],
                ok=False)
    assert p.returncode != 0
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("prunetune: error:")]
    assert len(lines) == 2 and "asks for FSDP but accelerate runs it as MULTI_CPU (FSDP needs GPUs)" in lines[0]
    assert "[rank0]: Traceback" not in p.stderr and "[rank1]: Traceback" not in p.stderr  # the ranks' own output


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fsdp2_on_gpus_keeps_masks_exact(tmp_path, pruned, text, mode):
    """The shipped config with stock accelerate on the machine's GPUs (2 when there are, else 1: still FSDP2,
    DTensor parameters, NCCL, the gathering to rank 0)."""
    nproc = min(2, torch.cuda.device_count())
    out = _run(_accelerate_fsdp(nproc, "-m", "prunetune.cli"), pruned, text, mode, tmp_path / mode)
    if nproc == 2:
        _check_fsdp_run(out, pruned, nproc)
        return
    want = MaskSet.load(pruned)  # one process: 2 steps per epoch x 3 at batch 4 would be 4 x 3; only the masks
    m = json.loads((out / "metrics.json").read_text())
    assert m["fsdp"] is True and m["sparsity"] == 0.5
    w = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(w[f"{n}.weight"] == 0, ~want[n]) for n in want.names())


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("kw, needle", [
    ({"method": type("M", (), {"name": "payt"})()}, "method 'payt' does not run under FSDP"),
    ({"mix": 0.2}, "--mix labels general text"),
    ({"kd": True, "lora": False}, "a separate teacher would be a whole unsharded model"),
    ({"kd": True, "teacher": "dense"}, "a separate teacher"),
    ({"task": "seq2seq"}, "seq2seq fine-tuning does not run under FSDP"),
])
def test_what_fsdp_does_not_support_is_refused_in_one_line(monkeypatch, kw, needle):
    from prunetune.errors import PrunetuneError
    from prunetune.tuning.fsdp import check_fsdp_run

    args = {"method": None, "kd": False, "lora": True, "teacher": "initial", "teacher_model": None, "mix": 0.0,
            "task": "causal-lm", **kw}
    check_fsdp_run(**args)  # no FSDP launch: nothing to refuse
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(PrunetuneError, match=needle):
        check_fsdp_run(**args)


def test_weightless_copy_holds_no_weights_and_takes_a_full_state_dict():
    """The copy rank 0 keeps while FSDP shards the model: meta parameters, real buffers, shared objects kept,
    and after loading a state dict it is the same model."""
    from prunetune.models.loading import load_model
    from prunetune.tuning.fsdp import model_on_meta, weightless_copy
    from prunetune.tuning.lora import apply_lora, mask_lora_updates

    lm = load_model("tiny-llama", "causal-lm")
    masks = MaskSet.from_model(lm.model)
    peft = apply_lora(lm.model, "causal-lm")
    mask_lora_updates(peft, masks)
    copy = weightless_copy(peft, share=(masks,))
    assert model_on_meta(copy) and not model_on_meta(peft)
    assert all(b.device.type == "cpu" for b in copy.buffers())
    layer = copy.base_model.model.model.layers[0].self_attn.q_proj
    assert layer._pt_masks is masks  # masked LoRA layers still read the run's MaskSet
    state = peft.state_dict()
    copy.load_state_dict(state, strict=True, assign=True)
    assert not model_on_meta(copy)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(copy(input_ids=ids).logits, peft(input_ids=ids).logits)
