"""`python -m lib_unetmods.soak`: the soak (lab/soak.py)."""
import sys

from .lab.soak import main

if __name__ == "__main__":
    sys.exit(main())
