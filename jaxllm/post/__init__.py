"""Post-training: supervised fine-tuning, preference optimisation and distillation."""
