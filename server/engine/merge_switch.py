"""Merged-weight switching of the engine: merged mode's swap at a drain point, auto mode's merge and unmerge
between steps (the policy that decides is server.engine.auto_mode)."""

from __future__ import annotations

import logging

from server.config import LoraMode

log = logging.getLogger(__name__)


def maybe_swap(engine) -> None:
    """Merged mode: at a drain point, merge the adapter at the head of the queue. Auto: see auto_switch."""
    if engine.swapper is None:
        return
    if engine.mode is LoraMode.AUTO:
        auto_switch(engine)
        return
    if engine.scheduler.running or not engine.scheduler.waiting:
        return
    head = engine.scheduler.peek() or engine.scheduler.waiting[0]  # the request admitted next
    swap_to(engine, head.adapter_key, head.adapter.weights if head.adapter is not None else None)


def auto_switch(engine) -> None:
    """Merge or unmerge between steps, without draining (server.engine.auto_mode)."""
    demand = list(engine.scheduler.running) + list(engine.scheduler.waiting)
    if not demand:
        return
    keys = {r.adapter_key for r in demand}
    if engine.merged_active:
        if keys != {engine.swapper.current}:  # another adapter or the base model is wanted: unmerge now
            swap_to(engine, None, None)
            engine.merged_active = False
            for request in list(engine.scheduler.running):
                slot = engine.slot_table.acquire(request.adapter_key, request.adapter.weights, wait=True)
                if slot is None:  # cannot happen with one adapter running; recompute rather than misapply
                    engine.scheduler.preempt(request)
                else:
                    request.slot = slot
        return
    single = demand[0].adapter_key if len(keys) == 1 and demand[0].adapter is not None else None
    lasted = engine.auto_policy.demand_lasted(single)
    if single is None:
        return
    remaining = max(r.params.max_tokens - len(r.output_token_ids) for r in demand)
    if not engine.auto_policy.should_merge(single, remaining, lasted, len(engine.scheduler.running)):
        return
    for request in engine.scheduler.running:  # their rows now read the merged weights, not a slot
        if request.slot >= 0:
            engine.slot_table.release(request.adapter_key)
            request.slot = -1
    swap_to(engine, demand[0].adapter_key, demand[0].adapter.weights)
    engine.merged_active = True


def swap_to(engine, key, weights) -> None:
    if key == engine.swapper.current:
        return
    seconds = engine.swapper.swap(key, weights)
    engine.auto_policy.record_swap(seconds)
    engine.metrics.record_swap("merged", seconds)
    log.info("merged swap to %s in %.1f ms", key, seconds * 1e3)
