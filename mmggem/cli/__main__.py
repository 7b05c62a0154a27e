"""`python -m mmggem.cli`, the form `accelerate launch -m mmggem.cli` uses."""
import sys

from . import main

sys.exit(main())
