"""`python -m mmggem.cli`, kept beside `python -m mmggem` (mmggem/__main__.py) for scripts that use it."""
import sys

from . import main

sys.exit(main())
