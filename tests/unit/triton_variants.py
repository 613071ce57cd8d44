"""Stand-in for a @triton.jit kernel that records the variants Triton would build for its launches."""

from __future__ import annotations

import torch


class LaunchRecorder:
    """Stands in for a @triton.jit kernel: the variants Triton would build for its launches, by its rule: the
    compile-time (upper-case) arguments, and for each integer argument not in `runtime_ints` whether it is
    1 and whether it is divisible by 16."""

    def __init__(self, param_names: list[str] = (), runtime_ints: tuple[str, ...] = ()):
        self.variants: set[tuple] = set()
        self.param_names, self.runtime_ints = list(param_names), set(runtime_ints)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = zip(self.param_names, args, strict=False)  # no names: no integer arguments counted
            named = list(named)
            ints = tuple((name, value == 1, value % 16 == 0) for name, value in named
                         if isinstance(value, int) and name not in self.runtime_ints)
            # a tensor's dtype, and whether its address is 16-byte aligned (Triton specializes pointers on it)
            dtypes = tuple((name, str(value.dtype), value.data_ptr() % 16 == 0) for name, value in named
                           if isinstance(value, torch.Tensor))
            self.variants.add(tuple(sorted((k, v) for k, v in kwargs.items() if k.isupper())) + ints + dtypes)
        return launch
