"""``python -m pathology`` is ``python -m pathology.cli``."""
import sys

from .cli import main

sys.exit(main())
