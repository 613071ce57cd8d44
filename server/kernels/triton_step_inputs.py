"""A decode replay's static inputs written from its one host-to-device copy in one kernel (DecodeGraphs._fill).

_fill sends every value of a step (the per-row fields, each sequence's block table, the logit rows, the LoRA tiles)
to the device in one int64 array, then spread them into the graph's static tensors with torch: four device copies,
three casting copies, a gather of the block tables and its cast, about nine launches a step (~10 us of the 1B
batch-32 step's 1.16 ms of GPU time on the H200, and their host launch time). Here one launch does all of it:
program r < bucket writes row r's fields and block-table row, the last program the logit rows and LoRA tiles.
Semantics: cuda_graphs.scatter_torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_run(dst_ptr, src_ptr, count, BLOCK: tl.constexpr):
    """dst[:count] = src[:count], cast to dst's dtype."""
    for start in range(0, count, BLOCK):
        at = start + tl.arange(0, BLOCK)
        keep = at < count
        tl.store(dst_ptr + at, tl.load(src_ptr + at, mask=keep).to(dst_ptr.dtype.element_ty), mask=keep)


# Every count and offset changes from step to step: specialized on them (1, multiples of 16), a step would meet a
# variant not compiled yet (DecodeGraphs.capture_all compiles the two variants there are: tiled or not)
@triton.jit(do_not_specialize=["bucket", "width", "stride_tables", "tables_at", "logit_at", "num_logit", "starts_at",
                               "num_starts", "num_tile_slots"])
def _fill_kernel(values_ptr, ids_ptr, positions_ptr, slots_ptr, context_ptr, lora_ptr, tables_ptr, logit_ptr,
                 starts_ptr, tile_slots_ptr, bucket, width, stride_tables, tables_at, logit_at, num_logit, starts_at,
                 num_starts, num_tile_slots, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    if row < bucket:
        field = values_ptr + row  # fields are [6, bucket]: 5 inputs (DECODE_ROW_FIELDS' order), then the owner
        tl.store(ids_ptr + row, tl.load(field).to(ids_ptr.dtype.element_ty))
        tl.store(positions_ptr + row, tl.load(field + bucket).to(positions_ptr.dtype.element_ty))
        tl.store(slots_ptr + row, tl.load(field + 2 * bucket).to(slots_ptr.dtype.element_ty))
        tl.store(context_ptr + row, tl.load(field + 3 * bucket).to(context_ptr.dtype.element_ty))
        tl.store(lora_ptr + row, tl.load(field + 4 * bucket).to(lora_ptr.dtype.element_ty))
        owner = tl.load(field + 5 * bucket)  # the row's sequence: its table row
        _copy_run(tables_ptr + row.to(tl.int64) * stride_tables, values_ptr + tables_at + owner * width, width, BLOCK)
    else:
        _copy_run(logit_ptr, values_ptr + logit_at, num_logit, BLOCK)
        _copy_run(starts_ptr, values_ptr + starts_at, num_starts, BLOCK)
        _copy_run(tile_slots_ptr, values_ptr + starts_at + num_starts, num_tile_slots, BLOCK)


def scatter_step_inputs(inputs: dict[str, torch.Tensor], values: torch.Tensor, fields: tuple[str, ...], bucket: int,
                        width: int, num_tables: int) -> None:
    """values (int64, on the device): the fields [6, bucket] (`fields` in order, then the owners), the tables
    [num_tables, width], the logit rows, then (tiled graphs) the tile starts and slots, as _fill lays them out.
    Writes inputs[field][:bucket], inputs["block_tables"][:, :width] (the owner's row each), inputs["logit_rows"]
    and the tiles: the static tensors must be contiguous (the block tables along their rows)."""
    if len(fields) != 5:
        raise ValueError(f"the fill kernel writes 5 row fields, got {fields}")
    tables = inputs["block_tables"]
    if tables.stride(1) != 1 or not all(inputs[name].is_contiguous() for name in fields):
        raise ValueError("the static inputs must be contiguous")
    tiled = "lora_tile_starts" in inputs
    starts = inputs["lora_tile_starts"] if tiled else values
    tile_slots = inputs["lora_tile_slots"] if tiled else values
    tables_at = 6 * bucket
    logit_at = tables_at + num_tables * width
    num_logit = inputs["logit_rows"].numel()
    _fill_kernel[(bucket + 1,)](
        values, *(inputs[name] for name in fields), tables, inputs["logit_rows"], starts, tile_slots,
        bucket, width, tables.stride(0), tables_at, logit_at, num_logit, logit_at + num_logit,
        starts.numel() if tiled else 0, tile_slots.numel() if tiled else 0, BLOCK=128, num_warps=1,
    )
