"""`python -m lib_unetmods.quality`: the quality lab (lab/quality/cli.py)."""
import sys

from .lab.quality.cli import main

if __name__ == "__main__":
    sys.exit(main())
