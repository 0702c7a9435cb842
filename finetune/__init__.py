"""The LoRA fine-tuning command, `python -m finetune` (finetune/train.py).

It trains adapters for the engine to serve, with the engine's own model loader and prompt
format, and lives beside engine/ rather than in it: nothing that serves imports it.
"""
