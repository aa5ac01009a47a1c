"""Drafter training, data regeneration with the target, and the built-in small model's pipeline."""
