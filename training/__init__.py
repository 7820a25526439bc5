"""Fine-tuning the causal generator: data preparation, LoRA / full / pose training."""
