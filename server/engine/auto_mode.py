"""When `--lora-mode auto` merges an adapter into the base, decided from measured costs, never by draining.

Merged decode steps skip the LoRA ops (at 8B batch 32 on an H200: 11.9 ms against 13.8 ms for 32
mixed adapters), but only requests of the merged adapter can run, and a swap stalls the whole batch
(150-230 ms there). So auto merges only while every running and waiting request uses one adapter, and
only when the time it expects to save before that demand ends pays for the swap in and the swap back:

    gain_per_step * max(remaining_steps, lasted_steps) > swap_in + swap_out

`gain_per_step` is the measured difference between unmerged-with-LoRA and merged decode steps of the same
batch size (until both were measured, over all sizes; until a merged step has been measured, a prior
fraction of the unmerged step), `remaining_steps` the most
tokens any current request may still produce, and the swap time the measured one (zero before the
first swap, so the first chance to merge is taken and measured). `lasted_steps` is how long the demand
has been this one adapter already: traffic that keeps coming (new requests replacing finished ones) is
seen by the current requests' remaining tokens alone as always about to end, so it would never merge.
Counting the steps already spent is the ski-rental rule: by the time the merge pays off, the steps
lost unmerged equal the swap cost, so auto is never worse than about twice the best choice in hindsight,
and on lasting single-adapter traffic it runs merged nearly all the time. The arrivals say sooner that
traffic is steady: when the last ARRIVAL_WINDOW requests all named the adapter all demand is for, auto
merges at once, whatever gain was measured (with Zipf(1.0) over 32 adapters, 16 arrivals in a row for
the most popular one happen with odds of about 1 in 10^10; a wrong guess costs two swaps). As soon as
a request for another adapter or the base model arrives, auto unmerges before the next step: nothing
waits for a drain.
The swap cost is known before traffic: the engine times a warm-up swap at start-up (MergedSwapper.warm_up).

The arrivals also say when single demand will end: if the window holds arrivals for other adapters,
the next one is expected after `span / others` seconds (span: from the oldest arrival of the window to
now, so the estimate grows by itself when arrivals stop), and the demand is not trusted to last longer
than that. This keeps auto unmerged when all demand is one adapter's only between requests for others
(a long request among short ones, or requests reaching the engine one by one as their weights load from
disk), where the request's own remaining tokens made it merge, and the next arrival unmerge.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

PRIOR_LORA_FRACTION = 0.10  # LoRA share of an unmerged step before anything is measured
EMA_WEIGHT = 0.2
ARRIVAL_WINDOW = 16  # arrivals in a row for one adapter that make its traffic steady


@dataclass
class AutoModePolicy:
    """Running estimates of step and swap costs, and the merge decision."""

    unmerged_step_s: float | None = None  # decode steps with LoRA rows, any batch size
    merged_step_s: float | None = None
    swap_s: float = 0.0  # one swap (in or out)
    # The same, per batch-size bucket (next power of two of the decode rows): merged steps often run at a
    # load's tail with a few rows and unmerged ones with a full batch, so only like compares with like.
    steps_by_rows: dict[tuple[bool, int], float] = field(default_factory=dict)
    single_demand: tuple[Hashable, int] = (None, 0)  # (the one adapter all demand is for, steps so far)
    # (adapter key, arrival time), newest last
    arrivals: deque = field(default_factory=lambda: deque(maxlen=ARRIVAL_WINDOW))
    clock: Callable[[], float] = time.perf_counter

    def record_arrival(self, key: Hashable) -> None:
        self.arrivals.append((key, self.clock()))

    def on_idle(self) -> None:
        """No demand at all: arrivals before the pause say nothing about the traffic after it."""
        self.arrivals.clear()

    def is_steady(self, key: Hashable) -> bool:
        """Whether the last ARRIVAL_WINDOW arrivals all named adapter `key`."""
        return len(self.arrivals) == ARRIVAL_WINDOW and all(k == key for k, _ in self.arrivals)

    def other_arrival_in_s(self, key: Hashable) -> float | None:
        """Seconds until a request for another adapter is expected (the window's rate of them), or None
        when the window holds none."""
        others = sum(k != key for k, _ in self.arrivals)
        if not others:
            return None
        return (self.clock() - self.arrivals[0][1]) / others

    def record_step(self, merged: bool, seconds: float, rows: int = 0) -> None:
        if merged:
            self.merged_step_s = _ema(self.merged_step_s, seconds)
        else:
            self.unmerged_step_s = _ema(self.unmerged_step_s, seconds)
        if rows:
            key = (merged, _bucket(rows))
            self.steps_by_rows[key] = _ema(self.steps_by_rows.get(key), seconds)

    def record_swap(self, seconds: float) -> None:
        self.swap_s = seconds if self.swap_s == 0.0 else _ema(self.swap_s, seconds)

    def gain_per_step_s(self, rows: int = 0) -> float:
        """Seconds a merged step saves over an unmerged one of `rows` decode rows: measured at that batch
        size if both kinds were, else over all sizes, else a prior share of the unmerged step."""
        unmerged = self.steps_by_rows.get((False, _bucket(rows))) if rows else None
        merged = self.steps_by_rows.get((True, _bucket(rows))) if rows else None
        if unmerged is None or merged is None:
            unmerged, merged = self.unmerged_step_s, self.merged_step_s
        if unmerged is None:
            return 0.0
        if merged is None:
            return PRIOR_LORA_FRACTION * unmerged
        return max(0.0, unmerged - merged)

    def demand_lasted(self, key: Hashable) -> int:
        """Steps before this one that all demand was already for adapter `key` (None: mixed demand, or
        the base model; the count starts over)."""
        lasted = self.single_demand[1] + 1 if key is not None and self.single_demand[0] == key else 0
        self.single_demand = (key, lasted)
        return lasted

    def should_merge(self, key: Hashable, remaining_steps: int, lasted_steps: int = 0, rows: int = 0) -> bool:
        """Merge adapter `key` now, all demand being for it: its requests (`rows` of them decoding) may
        produce `remaining_steps` more tokens, and the demand has lasted `lasted_steps` steps so far.

        Steady traffic merges whatever the measured gain: a merged step does the unmerged step's work less
        the LoRA ops, so a gain measured at or below zero is noise, and trusting it would keep auto
        unmerged for good (merged steps, the only way to measure again, would never run). A wrong bet
        costs two swaps; a missed one the LoRA share of every step while the traffic lasts."""
        if self.is_steady(key):
            return remaining_steps > 1
        if self.swap_s == 0.0:
            return remaining_steps > 1  # never measured: merge once to learn the costs
        horizon = remaining_steps
        other_in_s = self.other_arrival_in_s(key)
        if other_in_s is not None and self.unmerged_step_s:
            horizon = min(horizon, other_in_s / self.unmerged_step_s)
        return self.gain_per_step_s(rows) * max(horizon, lasted_steps) > 2.0 * self.swap_s


def _bucket(rows: int) -> int:
    return 1 << max(0, rows - 1).bit_length()


def _ema(previous: float | None, value: float) -> float:
    return value if previous is None else (1.0 - EMA_WEIGHT) * previous + EMA_WEIGHT * value
