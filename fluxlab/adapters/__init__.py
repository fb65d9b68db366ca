"""Adapters on a frozen Flux: LoRA training with peft, LoRA files, merging."""
