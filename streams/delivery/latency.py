"""Steering micro-batches by a p99 latency target (`INFLOW_LATENCY_TARGET_MS`).

The fixed knobs (max_batch_size, max_batch_tokens, max_wait_ms) stay as bounds; inside them,
`LatencyTarget` picks each batch's limits from what it measures:

* the batch time by padded tokens, `infer_ms ~ fixed + per_token x tokens`, fitted by
  exponentially weighted least squares over recent batches (`BatchTimeModel`);
* the tail: the p99 of "record taken -> prediction acknowledged" over a sliding window, fed by
  the infer stage (`observe_latency`);
* the queue: how many padded tokens wait, and how long they take to run at those limits.

An event waits at most for the batch running when it arrived and then for its own, so a batch
budget of about half the target keeps it on target. The budget shrinks when the measured p99
nears the target and grows back while the tail has room. When the queue holds more work than
the target allows anyway (a backlog after a restart, a burst), those texts are late whatever
happens, so batches grow to the bounds: the largest batches drain it soonest. The batcher waits
for company on an idle engine only when a batch's fixed cost outweighs a text's own (a GPU),
and never longer than the slack left in the budget; on a CPU a text's cost is its own, so it
never waits.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from streams.delivery.batcher import BatchCost, BatchLimits, BatchPolicy


@dataclass(slots=True)
class BatchTimeModel:
    """`infer_ms ~ fixed_ms + per_token_ms x padded_tokens` over recent batches (each batch's
    weight decays by `decay` per newer batch, so a slower neighbour or a new engine shows
    within a few dozen batches)."""

    decay: float = 0.97
    _w: float = 0.0
    _x: float = 0.0
    _y: float = 0.0
    _xx: float = 0.0
    _xy: float = 0.0
    _texts: float = 0.0  # decayed texts and real tokens: the mean text length
    _real: float = 0.0

    def observe(self, cost: BatchCost) -> None:
        d = self.decay
        x, y = float(cost.padded_tokens), cost.infer_ms
        self._w = self._w * d + 1.0
        self._x = self._x * d + x
        self._y = self._y * d + y
        self._xx = self._xx * d + x * x
        self._xy = self._xy * d + x * y
        self._texts = self._texts * d + cost.size
        self._real = self._real * d + cost.real_tokens

    @property
    def fitted(self) -> bool:
        return self._w >= 3.0 and self._x > 0

    @property
    def mean_text_tokens(self) -> float:
        return self._real / self._texts if self._texts else 0.0

    def coefficients(self) -> tuple[float, float]:
        """(fixed_ms, per_token_ms), both >= 0. Batches of one size only give no slope: the
        time is then taken as proportional to tokens (the cautious reading for growth)."""
        if not self.fitted:
            return 0.0, 0.0
        w = self._w
        mean_x, mean_y = self._x / w, self._y / w
        var = self._xx / w - mean_x * mean_x
        if var <= 1e-6 * mean_x * mean_x:
            return 0.0, mean_y / mean_x
        slope = max(0.0, (self._xy / w - mean_x * mean_y) / var)
        if slope == 0.0:
            return 0.0, mean_y / mean_x
        return max(0.0, mean_y - slope * mean_x), slope

    def predict_ms(self, padded_tokens: int) -> float:
        fixed, per_token = self.coefficients()
        return fixed + per_token * padded_tokens

    def tokens_within(self, ms: float) -> int:
        """The most padded tokens one batch can hold and still run in `ms`."""
        fixed, per_token = self.coefficients()
        if per_token <= 0.0:
            return 1 << 30
        return max(0, int((ms - fixed) / per_token + 1e-9))


class LatencyTarget:
    """Chooses the next batch's limits inside `bounds` to keep the p99 under `target_ms`."""

    WINDOW_S = 30.0  # the measured p99 is over the latest this-many seconds ...
    MIN_SAMPLES = 20  # ... and needs this many latencies
    RATE_WINDOW_S = 2.0  # the arrival rate is over the latest this-many seconds
    ADJUST_EVERY_S = 0.5
    SHRINK, GROW = 0.8, 1.1  # budget steps when the tail is near the target / has room
    NEAR, ROOM = 0.8, 0.5  # fractions of the target
    # The engine's busy share batches are sized for: queues stay short below it.
    UTILISATION = 0.7
    # Batches grow to the bounds in a backlog only when the model says that buys this much
    # throughput: bigger batches also pad more, which it does not see (a CPU gains ~nothing).
    WORTH_GROWING = 1.25

    def __init__(
        self,
        target_ms: float,
        bounds: BatchPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not target_ms > 0:
            raise ValueError(f"the latency target must be positive, got {target_ms}")
        self.target_ms = float(target_ms)
        self.bounds = bounds
        self.model = BatchTimeModel()
        self.budget_ms = self.target_ms / 2  # the time one batch may take
        self._clock = clock
        self._latencies: deque[tuple[float, float]] = deque(maxlen=8192)
        self._arrivals: deque[float] = deque(maxlen=65536)
        self._busy: deque[tuple[float, float]] = deque(maxlen=65536)  # (ended, infer_ms)
        self._slots = 1
        self._next_adjust = clock() + self.ADJUST_EVERY_S
        self._p99: float | None = None
        self.chosen = BatchLimits(bounds.max_batch_size, bounds.max_batch_tokens, 0.0)
        self.overloaded = False

    def restart(self, bounds: BatchPolicy) -> None:
        """A new engine: its batch times are measured anew, within its bounds."""
        self.bounds = bounds
        self.model = BatchTimeModel()
        self.budget_ms = self.target_ms / 2

    # ----------------------------------------------------------------- measuring

    def observe_arrival(self) -> None:
        self._arrivals.append(self._clock())

    def observe_batch(self, cost: BatchCost) -> None:
        self.model.observe(cost)
        self._busy.append((self._clock(), cost.infer_ms))

    def utilisation(self) -> float:
        """The engine slots' busy share over the latest `RATE_WINDOW_S`."""
        now = self._clock()
        while self._busy and self._busy[0][0] < now - self.RATE_WINDOW_S:
            self._busy.popleft()
        busy_ms = sum(ms for _, ms in self._busy)
        return busy_ms / (self.RATE_WINDOW_S * 1000 * self._slots)

    def observe_latency(self, ms: float) -> None:
        """One event's "taken -> acknowledged" time."""
        now = self._clock()
        self._latencies.append((now, ms))
        if now >= self._next_adjust:
            self._next_adjust = now + self.ADJUST_EVERY_S
            self._adjust()

    def arrival_rate(self) -> float:
        """Texts per second submitted over the latest `RATE_WINDOW_S`."""
        now = self._clock()
        while self._arrivals and self._arrivals[0] < now - self.RATE_WINDOW_S:
            self._arrivals.popleft()
        return len(self._arrivals) / self.RATE_WINDOW_S

    def p99_ms(self) -> float | None:
        """The measured p99 over the window (None until `MIN_SAMPLES` latencies)."""
        now = self._clock()
        while self._latencies and self._latencies[0][0] < now - self.WINDOW_S:
            self._latencies.popleft()
        if len(self._latencies) < self.MIN_SAMPLES:
            return None
        values = sorted(ms for _, ms in self._latencies)
        return values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)]

    def _adjust(self) -> None:
        p99 = self.p99_ms()
        self._p99 = p99
        if p99 is None or self.overloaded:
            return  # a backlog's latencies say nothing about the batch budget
        if p99 > self.NEAR * self.target_ms:
            # The tail is the batches themselves when two of the longest recent ones explain
            # it: smaller batches shorten it. Otherwise it is queueing (bigger batches drain
            # a busy engine sooner) or time outside the engine (batch size cannot help).
            recent = max((ms for _, ms in self._busy), default=0.0)
            if 2 * recent > self.NEAR * self.target_ms:
                self.budget_ms *= self.SHRINK
            elif self.utilisation() > self.UTILISATION:
                self.budget_ms *= self.GROW
        elif p99 < self.ROOM * self.target_ms:
            self.budget_ms *= self.GROW
        # One text of typical length always fits; a batch gets at most half of the target.
        floor = self.model.predict_ms(max(1, round(self.model.mean_text_tokens)))
        self.budget_ms = min(max(self.budget_ms, floor, 0.01 * self.target_ms), self.target_ms / 2)

    # ----------------------------------------------------------------- choosing

    def limits(self, queued_tokens: int, slots: int = 1) -> BatchLimits:
        """The limits for the next batch, given the padded tokens queued (longest x count) and
        the batches the engine runs at once."""
        bounds, model = self.bounds, self.model
        self._slots = max(1, slots)
        if not model.fitted:
            self.chosen = BatchLimits(bounds.max_batch_size, bounds.max_batch_tokens, 0.0)
            return self.chosen
        fixed, per_token = model.coefficients()
        mean_len = max(1.0, model.mean_text_tokens)
        per_text = per_token * mean_len
        # The fewest texts per batch that keep each engine slot busy at most UTILISATION of the
        # time at the current arrival rate: rate x (fixed + per_text x n) / n <= UTILISATION.
        rate_per_ms = self.arrival_rate() / max(1, slots) / 1000
        spare = self.UTILISATION - rate_per_ms * per_text
        needed = bounds.max_batch_size if spare <= 0 else math.ceil(rate_per_ms * fixed / spare)
        # The most that fit the budget (half the target: a text waits for the batch running
        # when it came, then for its own). Batches that large are worth it only where the
        # model says they run faster per text (a fixed cost per batch: a GPU); on a CPU a
        # text costs the same alone, and the smallest batches keep the tail shortest.
        fit = max(1, int(model.tokens_within(self.budget_ms) // mean_len))
        grows = self._throughput(math.ceil(fit * mean_len)) >= (
            self.WORTH_GROWING * self._throughput(math.ceil(max(1, needed) * mean_len))
        )
        size = max(1, min(bounds.max_batch_size, max(needed, fit if grows else 1)))
        tokens = max(math.ceil(size * mean_len), model.tokens_within(self.budget_ms))
        tokens = max(1, min(bounds.max_batch_tokens, tokens))
        # A backlog: the queue takes longer than the target at these limits, so those texts
        # are late anyway; batches grow to the bounds if that drains it faster.
        batches = math.ceil(queued_tokens / tokens) if queued_tokens else 0
        late = batches * model.predict_ms(tokens) / max(1, slots) > self.target_ms
        self.overloaded = late and self._throughput(bounds.max_batch_tokens) >= (
            self.WORTH_GROWING * self._throughput(tokens)
        )
        if self.overloaded:
            self.chosen = BatchLimits(bounds.max_batch_size, bounds.max_batch_tokens, 0.0)
            return self.chosen
        self.chosen = BatchLimits(size, tokens, self._hold_ms(tokens, mean_len))
        return self.chosen

    def _throughput(self, tokens: int) -> float:
        """Tokens per ms a batch of `tokens` padded tokens runs at."""
        return tokens / max(self.model.predict_ms(tokens), 1e-9)

    def _hold_ms(self, tokens: int, mean_len: float) -> float:
        """How long an idle engine waits for company: only while a batch's fixed cost outweighs
        a text's own, and only within the budget the batch leaves."""
        fixed, per_token = self.model.coefficients()
        if fixed <= per_token * mean_len:
            return 0.0
        slack = self.budget_ms - self.model.predict_ms(tokens)
        return max(0.0, min(float(self.bounds.max_wait_ms), slack))

    @property
    def measured_p99_ms(self) -> float | None:
        """The p99 as of the latest adjustment (for metrics: no sorting at scrape time)."""
        return self._p99
