"""Progress lines for long command-line runs."""
from __future__ import annotations


def fmt_time(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
