"""The draft program for `eval.mesh_plan`: the drafting step (draft cache + one block) at the target's width."""

from __future__ import annotations

from eval.plan_common import Program


def build(name, cfg, args, mesh) -> Program:
    raise SystemExit(f"--program {name}: not yet")
