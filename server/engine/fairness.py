"""Fair admission across tenants: virtual token counters (VTC, Sheng et al., OSDI 2024) and caps.

Every tenant has a counter of the service it received: `prompt_token_weight` per prompt token when
its request is first admitted and `output_token_weight` per generated token, divided by the tenant's
`weight`. The waiting request admitted next is the oldest one of the tenant with the smallest counter,
so a tenant sending ten times the load gets no more than its share while others have work waiting,
and all of the server while they do not. A tenant that becomes active again has its counter lifted to
the smallest counter among active tenants (or, when none is active, to that of the last tenant to
leave): idle time banks no credit. `max_running_requests` caps a tenant's requests in the running
batch; the rest wait.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from server.engine.request import Request

DEFAULT_TENANT = ""  # requests that name no tenant share one


@dataclass(frozen=True)
class TenantPolicy:
    """Scheduling limits of one tenant; None means no limit of that kind."""

    weight: float = 1.0  # share relative to other tenants (2.0: twice the tokens of a 1.0 tenant)
    max_running_requests: int | None = None  # requests in the running batch at once
    max_queued_requests: int | None = None  # running + waiting; enforced by the API (429)


class TenantCounters:
    """Virtual token counters, active and running request counts per tenant."""

    def __init__(self, prompt_token_weight: float = 1.0, output_token_weight: float = 2.0,
                 policies: dict[str, TenantPolicy] | None = None, default: TenantPolicy | None = None,
                 is_fair: bool = True):
        self.prompt_token_weight = prompt_token_weight
        self.output_token_weight = output_token_weight
        self.policies = dict(policies or {})
        self.default = default or TenantPolicy()
        self.is_fair = is_fair  # False: first come, first served (caps still apply)
        self.counters: dict[str, float] = {}
        self._num_active: dict[str, int] = {}  # waiting + running requests
        self._num_running: dict[str, int] = {}
        self._last_departed = 0.0  # counter of the last tenant to become idle

    def policy(self, tenant: str) -> TenantPolicy:
        return self.policies.get(tenant, self.default)

    # ---- lifecycle events (called by the scheduler) ---------------------------------------------

    def on_arrival(self, tenant: str) -> None:
        """A request joined the queue; lift the counter of a tenant that was idle."""
        if self._num_active.get(tenant, 0) == 0:
            active = [self.counters.get(t, 0.0) for t, n in self._num_active.items() if n > 0]
            floor = min(active) if active else self._last_departed
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)
        self._num_active[tenant] = self._num_active.get(tenant, 0) + 1

    def on_departure(self, tenant: str) -> None:
        """A request left the engine (finished, aborted or failed)."""
        left = self._num_active.get(tenant, 0) - 1
        if left > 0:
            self._num_active[tenant] = left
            return
        self._num_active.pop(tenant, None)
        self._last_departed = self.counters.get(tenant, 0.0)

    def on_admitted(self, request: Request, is_first_admission: bool) -> None:
        """A request entered the running batch; its prompt is charged once (not on recompute)."""
        tenant = request.tenant
        self._num_running[tenant] = self._num_running.get(tenant, 0) + 1
        if is_first_admission:
            self.charge(tenant, self.prompt_token_weight * len(request.prompt_token_ids))

    def on_left_batch(self, request: Request) -> None:
        """A request left the running batch (finished or preempted)."""
        tenant = request.tenant
        left = self._num_running.get(tenant, 0) - 1
        if left > 0:
            self._num_running[tenant] = left
        else:
            self._num_running.pop(tenant, None)

    def charge_output(self, requests: Iterable[Request]) -> None:
        """One generated token for each request (a decode row or a prefill that completes)."""
        for request in requests:
            self.charge(request.tenant, self.output_token_weight)

    def refund_output(self, request: Request) -> None:
        """Take back charge_output's token for a decode row whose token was dropped (a step run ahead of its
        request's end, server.engine.overlap)."""
        self.charge(request.tenant, -self.output_token_weight)

    def charge(self, tenant: str, amount: float) -> None:
        self.counters[tenant] = self.counters.get(tenant, 0.0) + amount / self.policy(tenant).weight

    # ---- admission order --------------------------------------------------------------------------

    def num_running(self, tenant: str) -> int:
        return self._num_running.get(tenant, 0)

    def is_capped(self, tenant: str, leaving: int = 0) -> bool:
        """Whether the tenant is at its cap of running requests, `leaving` of them ending with the step in
        flight (server.engine.overlap)."""
        cap = self.policy(tenant).max_running_requests
        return cap is not None and self.num_running(tenant) - leaving >= cap

    def pick(self, waiting: Iterable[Request], excluded: set[int],
             leaving: Mapping[str, int] | None = None) -> Request | None:
        """The waiting request to try next: FCFS within a tenant, smallest counter across tenants (ties:
        the earlier queue position), skipping tenants at their cap and requests in `excluded` (ids).
        `leaving`: per tenant, running requests that end with the step in flight (not counted at the cap)."""
        best: Request | None = None
        seen: set[str] = set()
        num_tenants = len(self._num_active)  # every waiting request's tenant is active
        for request in waiting:
            if len(seen) == num_tenants:
                break  # every tenant's candidate has been seen
            tenant = request.tenant
            if tenant in seen or id(request) in excluded:
                continue
            seen.add(tenant)  # only the first eligible request of a tenant competes
            if self.is_capped(tenant, leaving.get(tenant, 0) if leaving else 0):
                continue
            if not self.is_fair:
                return request
            if best is None or self.counters.get(tenant, 0.0) < self.counters.get(best.tenant, 0.0):
                best = request
        return best
