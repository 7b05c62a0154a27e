"""`python -m mmggem`, the form `accelerate launch -m mmggem train ...` runs.

The same entry point as the `mmggem` console script and `python -m mmggem.cli`.
"""
import sys

from .cli import main

sys.exit(main())
