"""The AOT planner: does a program fit a mesh, and how fast at best, answered on a laptop before renting the mesh.

Each program users run (the target's prefill / verify / generate, the drafter's draft step, the drafter training
step) is compiled with abstract shapes on simulated devices (`jax.jit(...).lower(...).compile()`), and the figures
are XLA's own (`memory_analysis()`, `cost_analysis()`); nothing is allocated. `python -m hdflash_jax.aot_plan
--help`; docs/scaling.md has the planned meshes.
"""
