"""Asynchronous slot loads on CUDA (run on the GPU machine): the copy runs on a side stream after the
compute stream's queued work, the request waits while it runs, and the batch keeps decoding; outputs
equal those of a synchronous load."""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from server.engine.request import Request, RequestStatus, SamplingParams
from server.engine.slot_table import SLOT_LOADING
from tests.gpu.test_engine_gpu import gpu_engine
from tests.unit.test_mixed_batch_oracle import PROMPTS, adapter_refs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _pinned(ref):
    ref.weights.tensors = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in ref.weights.tensors.items()}
    return ref


def _greedy(prompt, n, adapter=None):
    return Request(list(prompt), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter=adapter)


def _timed_calls(monkeypatch, targets) -> dict:
    """Wrap each (module, name) in `targets` to add its host time (ms) to the returned dict."""
    spent: dict[str, float] = {}
    for module, name in targets:
        original = getattr(module, name)

        def timed(*args, _original=original, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[_name] = spent.get(_name, 0.0) + (time.perf_counter() - start) * 1e3

        monkeypatch.setattr(module, name, timed)
    return spent


def test_copy_waits_for_queued_compute_and_reports_loading(tiny_llama_dir, tiny_adapters, monkeypatch):
    from server.kernels.lora import triton_slot_load
    from server.model import lora

    refs = adapter_refs(tiny_llama_dir, tiny_adapters)
    engine = gpu_engine(tiny_llama_dir, max_slots=2)
    assert engine.lora_slots.is_async
    weights = _pinned(refs["attn-r4"]).weights  # pinned before the sleep is queued: pinning takes host time
    spent = _timed_calls(monkeypatch, [(lora, "stage"), (lora, "to_device"), (triton_slot_load, "scatter"),
                                       (torch, "_foreach_zero_"), (lora.LoraSlots, "_copy_into")])
    torch.cuda.synchronize()
    queued = time.perf_counter()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of queued work on the compute stream
    slot = engine.slot_table.acquire(("a", 1), weights)
    took = time.perf_counter() - queued
    pending = not torch.cuda.current_stream().query()
    # ordered after the queued work, so not done yet (the message says where acquire itself waited)
    assert slot == SLOT_LOADING, (f"acquire took {took * 1e3:.1f} ms (host ms by call: {spent}); compute still "
                                  f"queued after it: {pending}")
    torch.cuda.synchronize()
    assert engine.slot_table.acquire(("a", 1), refs["attn-r4"].weights) >= 0


def test_batch_decodes_while_a_cold_adapter_loads_and_outputs_match(tiny_llama_dir, tiny_adapters):
    refs = {k: _pinned(v) for k, v in adapter_refs(tiny_llama_dir, tiny_adapters).items()}

    def run(delay_copy: bool):
        engine = gpu_engine(tiny_llama_dir, max_slots=2)
        running = _greedy(PROMPTS[0], 12, refs["ko-r16"])
        engine.add_request(running)
        engine.step()
        cold = _greedy(PROMPTS[1], 8, refs["attn-r4"])
        engine.add_request(cold)
        if delay_copy:
            torch.cuda._sleep(100_000_000)  # the copy queues behind this: the next step cannot admit it
        waited = 0
        while engine.has_unfinished():
            engine.step()
            waited += cold.status is RequestStatus.WAITING
        return running.output_token_ids, cold.output_token_ids, waited

    sync_out = run(False)
    async_out = run(True)
    assert async_out[:2] == sync_out[:2]
    assert async_out[2] >= 1  # the cold request waited at least one step; the running one kept going


def test_slot_load_latency_and_decode_step_during_a_large_load():
    """Figures for the log: a 1B-shaped all-linear rank-16 adapter (about 45 MB) copied into a slot."""
    from server.model.lora import LoraSlots

    class Linear(torch.nn.Module):
        def __init__(self, n_in, n_out):
            super().__init__()
            self.base = torch.nn.Linear(n_in, n_out, bias=False, device="cuda", dtype=torch.bfloat16)

    hidden, inter, layers, rank = 2048, 8192, 16, 16
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, 512), "v_proj": (hidden, 512),
              "o_proj": (hidden, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
              "down_proj": (inter, hidden)}
    from server.model.lora import LoraLinear

    linears = [(i, LoraLinear(Linear(*shapes[name]).base, (name,), [shapes[name][1]]))
               for i in range(layers) for name in shapes]

    class Model:
        dtype, device = torch.bfloat16, torch.device("cuda")

        def lora_linears(self):
            return linears

    from adapters_store import AdapterWeights

    tensors = {(i, name): (torch.randn(rank, shapes[name][0]).pin_memory(),
                           torch.randn(shapes[name][1], rank).pin_memory()) for i in range(layers) for name in shapes}
    adapter = AdapterWeights(rank=rank, alpha=16.0, use_rslora=False, scaling=1.0, tensors=tensors)
    nbytes = sum(a.numel() * 4 + b.numel() * 4 for a, b in tensors.values())
    slots = LoraSlots(Model(), 2 * rank, rank, num_slots=2)
    for _ in range(3):  # warm up
        slots.load(0, 0, adapter).synchronize()
    start = time.perf_counter()
    done = slots.load(1, rank, adapter)
    issued = time.perf_counter() - start
    done.synchronize()
    total = time.perf_counter() - start
    print(f"\nslot load of {nbytes / 1e6:.0f} MB fp32: issue {issued * 1e3:.2f} ms (engine thread), "
          f"complete {total * 1e3:.2f} ms (side stream)")
    assert issued < total


def test_batched_slot_load_from_pinned_pages_equals_the_per_linear_reference():
    """On CUDA the slot load moves the pinned memory the adapter occupies once and fills the pools with
    foreach calls or the scatter kernel (`LoraSlots._copy_into`); the pools equal `LoraLinear.load_slot`'s,
    linear by linear, bit for bit (bf16 and fp16 files, B scaled by a scale that bf16 cannot hold exactly),
    from pages of their own (`pin_packed`) and from the CPU tier's pool (pages that are views of one slab,
    copied as the spans the tensors occupy). Prints the issue times."""
    from adapters_store import AdapterWeights
    from server.model.lora import LoraLinear, LoraSlots
    from server.pinned_pages import PAGE_BYTES, PagePool, pin_packed

    pool = PagePool()
    pool.reserve(64 * PAGE_BYTES)

    hidden, inter, layers, rank = 2048, 8192, 4, 16
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, 512), "v_proj": (hidden, 512),
              "o_proj": (hidden, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
              "down_proj": (inter, hidden)}
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
             "o_proj": ("o_proj",), "down_proj": ("down_proj",)}

    def model():
        linears = []
        for i in range(layers):
            for parts in fused.values():
                base = torch.nn.Linear(shapes[parts[0]][0], sum(shapes[p][1] for p in parts), bias=False,
                                       device="cuda", dtype=torch.bfloat16)
                linears.append((i, LoraLinear(base, parts, [shapes[p][1] for p in parts])))

        class Model:
            dtype, device = torch.bfloat16, torch.device("cuda")

            def lora_linears(self):
                return linears

        return Model()

    gen = torch.Generator().manual_seed(0)
    for file_dtype in (torch.bfloat16, torch.float16):
        tensors = {(i, name): (torch.randn(rank, shapes[name][0], generator=gen).to(file_dtype),
                               torch.randn(shapes[name][1], rank, generator=gen).to(file_dtype))
                   for i in range(layers) for name in shapes if name != "k_proj"}  # k_proj: not targeted
        adapter = AdapterWeights(rank=rank, alpha=5.0, use_rslora=False, scaling=0.3, tensors=tensors)
        sources = {"pages": pin_packed(tensors)[0], "pool": pin_packed(tensors, lambda n: pool.take())[0]}
        reference = model()
        LoraSlots(reference, 3 * rank, rank, num_slots=2)  # allocates the reference's pools
        start = time.perf_counter()
        for layer, linear in reference.lora_linears():
            linear.load_slot(rank, rank, layer, adapter)
        torch.cuda.synchronize()
        per_linear = time.perf_counter() - start
        for (source, packed), use_scatter in itertools.product(sources.items(), (False, True)):
            paged = AdapterWeights(rank=rank, alpha=5.0, use_rslora=False, scaling=0.3, tensors=packed)
            batched = model()
            slots = LoraSlots(batched, 3 * rank, rank, num_slots=2)
            slots.use_scatter = use_scatter
            slots.load(0, rank, paged).synchronize()  # warm-up (and a kernel build)
            torch.cuda.synchronize()
            start = time.perf_counter()
            done = slots.load(1, rank, paged)
            issued = time.perf_counter() - start
            done.synchronize()
            print(f"\n{file_dtype} from {source}: {'scatter' if use_scatter else 'foreach'} slot load issued in "
                  f"{issued * 1e3:.2f} ms; per linear {per_linear * 1e3:.2f} ms")
            for (_, mine), (_, ref) in zip(batched.lora_linears(), reference.lora_linears(), strict=True):
                assert torch.equal(mine.lora_a, ref.lora_a) and torch.equal(mine.lora_b, ref.lora_b)
