"""The penalty sampler's per-request token counts, kept on the device and updated in place."""

from __future__ import annotations

import torch

from server.engine.request import Request
from server.kernels.host_device import to_device


class TokenCounts:
    """Token counts of the running requests that use a penalty, on the device, one row each.

    A row is filled once from the request's tokens when it first needs one, then each sampled token
    is added in place (no per-step rebuild); released rows are reused. The table is allocated at the
    first penalized request and doubles when full: 5 bytes x vocab per row (0.6 MiB for a 128k
    vocabulary), at most one row per request running at once.
    """

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = device
        self.output_counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)  # [rows, vocab]
        self.in_prompt = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)  # [rows, vocab]
        self.free_rows: list[int] = []

    def row_of(self, request: Request) -> int:
        """The request's row, filled from its prompt and output on first use."""
        if request.penalty_row < 0:
            if not self.free_rows:
                self._grow()
            row = self.free_rows.pop()
            outputs = to_device(request.output_token_ids, torch.long, self.device)
            prompt = to_device(request.prompt_token_ids, torch.long, self.device)
            # index_put rather than bincount, whose output size needs a host sync on CUDA.
            self.output_counts[row] = 0
            self.output_counts[row].index_put_((outputs,), torch.ones_like(outputs, dtype=torch.int32),
                                               accumulate=True)
            self.in_prompt[row] = False
            self.in_prompt[row, prompt] = True
            request.penalty_row = row
        return request.penalty_row

    def add(self, rows: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Count one more occurrence of token_ids[i] in row rows[i] (both [n] int64, on the device)."""
        self.output_counts.index_put_((rows, token_ids), torch.ones_like(rows, dtype=torch.int32),
                                      accumulate=True)

    def release(self, request: Request) -> None:
        if request.penalty_row >= 0:
            self.free_rows.append(request.penalty_row)
            request.penalty_row = -1

    def _grow(self) -> None:
        num_rows = self.output_counts.shape[0]
        extra = max(8, num_rows)
        self.output_counts = torch.cat([self.output_counts, self.output_counts.new_zeros(extra, self.vocab_size)])
        self.in_prompt = torch.cat([self.in_prompt, self.in_prompt.new_zeros(extra, self.vocab_size)])
        self.free_rows += range(num_rows + extra - 1, num_rows - 1, -1)
