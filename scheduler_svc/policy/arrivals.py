"""The recent request arrival rate, which the goodput policies weigh a step's length by.

A request that arrives during a step waits for the step's end before it is admitted; at a high arrival
rate a long step (a deep draft chain) delays every newcomer, which goodput alone does not see
(goodput.py, "Arrivals"). The rate is a count over a short sliding window: it follows a burst within
the window and falls back to zero once arrivals stop, when there is nobody to delay.
"""

from __future__ import annotations

import collections

DEFAULT_WINDOW_S = 0.5


class ArrivalRate:
    """Arrivals per millisecond over the last `window_s` seconds (0: always 0, arrivals ignored)."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S) -> None:
        if window_s < 0:
            raise ValueError(f"--arrival-window-s must be >= 0, got {window_s}")
        self.window_s = window_s
        self._times: collections.deque[float] = collections.deque()

    def observe(self, arrival_s: float) -> None:
        """One arrival at time arrival_s (time.perf_counter seconds)."""
        if self.window_s > 0:
            self._times.append(arrival_s)

    def per_ms(self, now_s: float) -> float:
        """Arrivals per ms in the window ending at now_s."""
        if self.window_s <= 0:
            return 0.0
        while self._times and self._times[0] <= now_s - self.window_s:
            self._times.popleft()
        return len(self._times) / (self.window_s * 1e3)
