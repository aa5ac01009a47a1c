"""DSpark: DeepSeek's block drafter with a Markov head, as shipped under `mtp.*` in recent V4 checkpoints."""
