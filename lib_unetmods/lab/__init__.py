"""The lab: everything around the runtime that only developers and benchmark users run, never
the WebUI. The benchmark and its comparisons with the reference packages, the soak, checkpoint
loading, random-weight test UNets, the sampler, and the quality lab (the proxy model, its data,
its training and the scores), and the stand-ins of the hosts (hosts/) the benchmark, the soak
and the tests run on. The lab imports the runtime; the runtime never imports the lab, and nothing
here loads from tests/.
"""
from __future__ import annotations

import os

CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/ is beside lib_unetmods/
