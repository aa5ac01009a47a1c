"""PyTorch DeepSeek-V4 checkpoints to Flax/orbax: the CLI (torch_to_flax), safetensors reading, FP8/FP4 dequantization."""
