"""`python -m lib_unetmods.bench`: the benchmark (lab/bench.py)."""
import sys

from .lab.bench import main

if __name__ == "__main__":
    sys.exit(main())
