"""Fine-tuning: LoRA/rsLoRA or full, with knowledge distillation and masks that stay zero."""
