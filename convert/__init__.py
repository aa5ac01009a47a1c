"""PyTorch DeepSeek-V4 checkpoints to Flax/orbax: the CLI (torch_to_flax), the tensor map, FP8/FP4 dequantization;
and the drafter export/import CLI (drafter_export)."""
