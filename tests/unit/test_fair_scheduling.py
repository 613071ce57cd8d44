"""Fair admission across tenants (virtual token counters) and per-tenant caps, on synthetic arrivals.

A fake step loop drives the real Scheduler: every request has the same prompt and output length, so
a fair share of admissions is a fair share of tokens. No model runs; everything is deterministic.
"""

from __future__ import annotations

import torch

from server.engine.fairness import TenantCounters, TenantPolicy
from server.engine.kv_cache import KVCache
from server.engine.request import Request, SamplingParams
from server.engine.scheduler import Admission, Scheduler

PROMPT_LEN, OUTPUT_LEN = 8, 4


class FakeEngine:
    """The scheduler plus a step that pretends to run the model: one token per scheduled sequence."""

    def __init__(self, tenants: TenantCounters, max_batch_size: int = 4):
        cache = KVCache(1, 256, 1, 4, torch.float32, torch.device("cpu"))
        self.scheduler = Scheduler(cache, max_batch_size, 64, lambda r: Admission.ADMIT, lambda r: None,
                                   tenants=tenants)
        self.admitted: list[str] = []  # tenant of each first admission, in order
        self.max_running: dict[str, int] = {}

    def add(self, tenant: str, count: int = 1) -> None:
        for _ in range(count):
            self.scheduler.add(Request([1] * PROMPT_LEN, SamplingParams(max_tokens=OUTPUT_LEN), tenant=tenant))

    def step(self) -> None:
        running_before = {id(r) for r in self.scheduler.running}
        batch = self.scheduler.schedule()
        self.admitted += [r.tenant for r, _ in batch.prefill if id(r) not in running_before]
        for tenant in {r.tenant for r in self.scheduler.running}:
            count = sum(r.tenant == tenant for r in self.scheduler.running)
            self.max_running[tenant] = max(self.max_running.get(tenant, 0), count)
        sampled = list(batch.decode)
        for request, chunk in batch.prefill:
            request.num_computed_tokens += chunk
            if not request.is_prefilling:
                sampled.append(request)
        for request in sampled:
            request.output_token_ids.append(2)
            request.num_computed_tokens = request.num_tokens - 1
            if len(request.output_token_ids) >= request.params.max_tokens:
                self.scheduler.finish(request)

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished():
                return
            self.step()


def test_light_tenant_gets_its_share_against_a_ten_times_heavier_one():
    engine = FakeEngine(TenantCounters())
    engine.add("heavy", 100)  # the heavy tenant's flood is queued first
    engine.add("light", 10)
    engine.run()
    first = engine.admitted[:20]
    # Equal costs and both backlogged: admissions alternate, so all 10 light requests are among the first
    # 20 (first come, first served would admit them after all 100 heavy ones).
    assert first.count("light") == 10
    assert engine.admitted.count("heavy") == 100


def test_fcfs_policy_keeps_arrival_order():
    engine = FakeEngine(TenantCounters(is_fair=False))
    engine.add("heavy", 20)
    engine.add("light", 2)
    engine.run()
    assert engine.admitted == ["heavy"] * 20 + ["light"] * 2


def test_light_tenant_is_served_at_once_while_a_heavy_one_floods():
    engine = FakeEngine(TenantCounters())  # 4 rows x 4 steps per request: one admission per step
    waits = []
    for step in range(400):
        engine.add("heavy", 1)  # the heavy tenant alone asks for the whole capacity...
        if step % 10 == 0:
            engine.add("light", 1)  # ...and the light one for a tenth of it, far below its half share
            arrived = step
        before = engine.admitted.count("light")
        engine.step()
        if engine.admitted.count("light") > before:
            waits.append(step - arrived)
    assert len(waits) == 40 and max(waits) <= 4  # never queued behind the heavy backlog
    assert engine.admitted.count("heavy") >= 350  # the rest of the capacity goes to the heavy tenant


def test_heavy_tenant_is_not_starved_while_the_light_one_is_idle():
    engine = FakeEngine(TenantCounters(), max_batch_size=4)
    engine.add("light", 3)
    engine.run()
    engine.add("heavy", 12)
    for _ in range(6):
        engine.step()
    assert engine.max_running["heavy"] == 4  # all of the batch: work-conserving


def test_returning_tenant_banks_no_credit_for_its_idle_time():
    engine = FakeEngine(TenantCounters(), max_batch_size=2)
    engine.add("heavy", 40)
    for _ in range(40):
        engine.step()  # the heavy tenant runs alone for a while
    done = len(engine.admitted)
    engine.add("light", 20)
    for _ in range(40):
        engine.step()
    after = engine.admitted[done:done + 20]
    # Lifted to the heavy tenant's counter on arrival, the light tenant alternates with it instead of
    # taking every admission until it caught up with the heavy tenant's past service.
    assert 8 <= after.count("light") <= 12


def test_weights_split_admissions_in_proportion():
    tenants = TenantCounters(policies={"gold": TenantPolicy(weight=3.0)})
    engine = FakeEngine(tenants)
    engine.add("silver", 60)
    engine.add("gold", 60)
    for _ in range(40):
        engine.step()
    first = engine.admitted[:40]
    assert 28 <= first.count("gold") <= 32  # 3:1


def test_running_cap_holds_and_the_others_fill_the_batch():
    tenants = TenantCounters(policies={"heavy": TenantPolicy(max_running_requests=2)})
    engine = FakeEngine(tenants, max_batch_size=8)
    engine.add("heavy", 30)
    engine.add("light", 30)
    engine.run()
    assert engine.max_running["heavy"] == 2
    assert engine.max_running["light"] == 6
    assert engine.admitted.count("heavy") == 30  # capped, not refused


def test_default_cap_applies_to_every_tenant_and_binds_even_when_alone():
    engine = FakeEngine(TenantCounters(default=TenantPolicy(max_running_requests=3)), max_batch_size=8)
    engine.add("a", 10)
    engine.run()
    assert engine.max_running["a"] == 3


def test_admission_order_is_deterministic():
    def run_once() -> list[str]:
        engine = FakeEngine(TenantCounters(policies={"b": TenantPolicy(weight=2.0, max_running_requests=3)}))
        for step in range(60):
            engine.add("a", 3)
            engine.add("b" if step % 3 else "c", 1)
            engine.step()
        engine.run()
        return engine.admitted

    assert run_once() == run_once()


def test_skipped_request_lets_the_same_tenants_next_request_and_others_go():
    cache = KVCache(1, 64, 1, 4, torch.float32, torch.device("cpu"))
    blocked = Request([1] * 4, SamplingParams(max_tokens=2), tenant="a")
    scheduler = Scheduler(cache, 8, 64, lambda r: Admission.SKIP if r is blocked else Admission.ADMIT,
                          lambda r: None, tenants=TenantCounters())
    scheduler.add(blocked)
    others = [Request([1] * 4, SamplingParams(max_tokens=2), tenant=t) for t in ("a", "b")]
    for request in others:
        scheduler.add(request)
    batch = scheduler.schedule()
    assert [r for r, _ in batch.prefill] == others
    assert list(scheduler.waiting) == [blocked]


def test_counters_charge_prompt_once_and_every_output_token():
    tenants = TenantCounters(prompt_token_weight=1.0, output_token_weight=2.0)
    engine = FakeEngine(tenants)
    engine.add("a", 1)
    engine.run()
    assert tenants.counters["a"] == PROMPT_LEN * 1.0 + OUTPUT_LEN * 2.0


def light_waits(is_fair: bool, num_steps: int = 2000) -> list[int]:
    """Steps each light request waited, with the heavy tenant at 10x its rate and the server 10% overloaded
    (one admission per step; heavy asks for one per step, light for one per ten steps)."""
    engine = FakeEngine(TenantCounters(is_fair=is_fair))
    waits, arrivals = [], []
    for step in range(num_steps):
        engine.add("heavy", 1)
        if step % 10 == 0:
            engine.add("light", 1)
            arrivals.append(step)
        before = engine.admitted.count("light")
        engine.step()
        waits += [step - arrivals.pop(0) for _ in range(engine.admitted.count("light") - before)]
    return sorted(waits)


def test_overload_queues_the_light_tenant_behind_the_flood_only_without_fairness():
    fair, fcfs = light_waits(True), light_waits(False)
    assert len(fair) == 200 and fair[-1] <= 2  # every light request admitted within 2 steps
    assert len(fcfs) < 200 and fcfs[len(fcfs) // 2] > 50  # FCFS: the backlog grows, light waits in it


def test_counts_return_to_zero_after_finish_abort_and_preemption():
    tenants = TenantCounters()
    engine = FakeEngine(tenants, max_batch_size=2)
    engine.add("a", 3)
    engine.add("b", 2)
    engine.step()
    running, waiting = engine.scheduler.running[0], engine.scheduler.waiting[-1]
    engine.scheduler.preempt(engine.scheduler.running[1])
    engine.scheduler.remove(running.request_id)  # abort a running request
    engine.scheduler.remove(waiting.request_id)  # and a waiting one
    engine.run()
    assert tenants._num_active == {} and tenants._num_running == {}
    engine.add("c", 1)  # a tenant arriving to an idle server starts from the last one's counter
    assert tenants.counters["c"] == tenants._last_departed > 0
