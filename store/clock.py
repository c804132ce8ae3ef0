"""The store's clock: times are Unix seconds (float); callers may pass ``now`` so
that tests can use an injected clock."""

from __future__ import annotations

import time


def _now(now: float | None) -> float:
    return time.time() if now is None else now
