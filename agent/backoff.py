"""Reconnect delays: exponential backoff with full jitter (pure).

``delay = uniform(0, min(cap, base * 2**attempt))`` (the "full jitter" of the AWS
architecture blog), so a fleet that lost its broker does not reconnect in lock-step.
"""

from __future__ import annotations

import random


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before reconnect attempt ``attempt`` (0-based)."""
    if attempt < 0:
        raise ValueError(f"attempt {attempt} is negative")
    ceiling = min(cap, base * (2 ** min(attempt, 32)))
    return rng.uniform(0.0, ceiling)
