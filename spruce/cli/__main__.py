"""`python -m spruce.cli ...` (as torchrun and accelerate launch run it): the `spruce` command."""

import sys

from . import main

sys.exit(main())
