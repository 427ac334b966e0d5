"""``python -m vbridge_core``: see :mod:`vbridge_core.cli`."""
import sys

from .cli import main

sys.exit(main())
