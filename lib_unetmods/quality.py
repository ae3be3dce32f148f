"""`python -m lib_unetmods.quality`: the quality lab (lab/quality.py)."""
import sys

from .lab.quality import main

if __name__ == "__main__":
    sys.exit(main())
