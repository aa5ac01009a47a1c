import sys

from hdflash_jax.aot_plan.cli import main

sys.exit(main())
