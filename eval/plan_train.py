"""The train program for `eval.mesh_plan`: the drafter training step (`train.trainer.Trainer._step`)."""

from __future__ import annotations

from eval.plan_common import Program


def build(name, cfg, args, mesh) -> Program:
    raise SystemExit(f"--program {name}: not yet")
