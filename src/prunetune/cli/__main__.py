"""`python -m prunetune.cli` (what torchrun / accelerate launch run on every rank)."""

from prunetune.cli import main

main()
