"""One Llama-family model in plain PyTorch, its checkpoint loader, sampling and generation loop."""
