"""Options that several commands share: one definition each (typer reads the flag names and help from
these), in the one option style of the CLI (`name: Annotated[type, typer.Option(...)] = default`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Task = Annotated[Optional[str], typer.Option("--task", help="task data: bbc-news | .csv/.jsonl (text,label) | text source")]
TaskType = Annotated[Optional[str], typer.Option("--task-type", help="seq-cls (labelled data) or causal-lm (plain text)")]
Lora = Annotated[Optional[bool], typer.Option("--lora/--full", "--use-lora/--no-use-lora", help="LoRA adapters or full FT")]
LoraRank = Annotated[Optional[int], typer.Option("--lora-rank")]
LoraAlpha = Annotated[Optional[float], typer.Option("--lora-alpha", help="LoRA scale numerator (recipe default: 2 x rank)")]
LoraDropout = Annotated[Optional[float], typer.Option("--lora-dropout")]
Rslora = Annotated[Optional[bool], typer.Option("--rslora/--no-rslora", "--use-rs-lora/--no-use-rs-lora",
                                        help="rank-stabilised scaling alpha/sqrt(r)")]
Kd = Annotated[Optional[bool], typer.Option("--kd/--no-kd", "--use-kd/--no-use-kd", help="distil from a teacher")]
KdAlpha = Annotated[Optional[float], typer.Option("--kd-alpha", help="weight of CE; 1-alpha weighs the KL term")]
KdTemp = Annotated[Optional[float], typer.Option("--kd-temp", help="softmax temperature T")]
Teacher = Annotated[Optional[str], typer.Option("--teacher", help="initial | dense | PATH")]
Epochs = Annotated[Optional[float], typer.Option("--epochs", "--num-epochs")]
Lr = Annotated[Optional[float], typer.Option("--lr", help="recipe default: 1e-3 (LoRA) / 1e-4 (full)")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size")]
MaxLength = Annotated[Optional[int], typer.Option("--max-length")]
NSamples = Annotated[Optional[int], typer.Option("--n-samples", help="training examples (0 = all)")]
EvalSamples = Annotated[Optional[int], typer.Option("--eval-samples", help="validation examples per epoch (0 = all)")]
TestSamples = Annotated[Optional[int], typer.Option("--test-samples", help="test examples scored (0 = the whole test split)")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="training seed (adapter init, data order); not the split")]
SplitSeed = Annotated[Optional[int], typer.Option("--split-seed", help="seed of the fixed train/validation/test split")]
Mix = Annotated[Optional[float], typer.Option("--mix", "--dataset-mix-ptg", help="fraction of general text mixed in")]
MixSource = Annotated[Optional[str], typer.Option("--mix-source")]
MixStrategy = Annotated[Optional[str], typer.Option("--mix-strategy", "--dataset-mix-strategy", help="random | old_first")]
MixSampling = Annotated[Optional[str], typer.Option("--mix-sampling", "--dataset-sampling-strategy", help="first | random")]
DataDir = Annotated[Optional[Path], typer.Option("--data-dir", help="local WikiText-2 dir")]
Retention = Annotated[Optional[bool], typer.Option("--retention/--no-retention", help="measure knowledge retention")]
RetentionWindows = Annotated[Optional[int], typer.Option("--retention-windows", min=1)]
PrintRecipe = Annotated[bool, typer.Option("--print-recipe", help="print the recipe this command runs (YAML) and exit")]
Resume = Annotated[bool, typer.Option("--resume", help="continue OUT: complete stages are skipped, an interrupted training "
                              "continues from its last checkpoint")]
SaveSteps = Annotated[Optional[int], typer.Option("--save-steps", min=1, help="also checkpoint every N optimizer steps "
                                          "(what --resume continues from; default: each epoch end)")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace a non-empty OUT")]
Out = Annotated[Optional[Path], typer.Option("--out", help="run directory (OUT/model, OUT/metrics.json, OUT/manifest.json)")]

NOT_FLAGS = ("model", "print_recipe", "resume", "overwrite", "out")
RECIPE_NOTE = "Flags left out keep the values of the command's recipe; --print-recipe shows every value."

#: the flags of the training commands -> recipe keys (finetune's; payt and losparse add their own)
TUNE_FLAGS = {
    "task": "data.train", "task_type": "model.task", "lora_rank": "tune.lora_rank", "lora_alpha": "tune.lora_alpha",
    "lora_dropout": "tune.lora_dropout", "rslora": "tune.rslora", "kd": "tune.kd", "kd_alpha": "tune.kd_alpha",
    "kd_temp": "tune.kd_temp", "teacher": "tune.teacher", "epochs": "tune.epochs", "lr": "tune.lr",
    "batch_size": "tune.batch_size", "max_length": "tune.seqlen", "n_samples": "tune.n_samples",
    "eval_samples": "tune.eval_samples", "test_samples": "tune.test_samples", "seed": "seed",
    "split_seed": "data.split_seed", "mix": "tune.mix.fraction", "mix_source": "tune.mix.source",
    "mix_strategy": "tune.mix.strategy", "mix_sampling": "tune.mix.sampling", "data_dir": "data.data_dir",
    "retention": "tune.retention", "retention_windows": "tune.retention_windows", "save_steps": "tune.save_steps",
}
