"""LoRA tests."""
