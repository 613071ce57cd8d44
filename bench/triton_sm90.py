"""Triton kernels compiled for the H100/H200 (sm_90) on a machine without a GPU, and what each costs an SM.

    python -m bench.triton_sm90    (needs triton; run it without TRITON_INTERPRET)

Prints the registers a thread and the shared memory a program of the decode step's LoRA kernels take at their
launch configurations (the ones `triton_lora` and `triton_lora_decode` choose for a batch-32 step of rank-16
adapters), and how many programs that lets an SM hold: for these DRAM-bound kernels, with a few KB of loads each,
the bytes in flight an SM are what bounds their bandwidth. The register count comes from the cubin that Triton's
ptxas built (EIATTR_REGCOUNT of its .nv.info section), so no driver is needed. `compile_sm90` is also the compile
tests' helper (tests/unit/test_triton_compile.py).
"""

from __future__ import annotations

import struct

FLOATS = {"eps", "qk_scale"}
SM90_REGISTERS = 65536  # a Hopper SM's register file, 32-bit registers
SM90_MAX_WARPS = 64
SM90_SHARED_BYTES = 228 * 1024  # shared memory an SM
_EIATTR_REGCOUNT = 0x2F
_EIFMT_SVAL = 0x04


def compile_sm90(fn, constexprs: dict, types: dict | None = None, num_warps: int = 4, ones: tuple = (),
                 aligned: tuple = ()):
    """Compile a @triton.jit kernel for sm_90: pointers default to bf16 (`types` names the others), `*_ptr`-less
    arguments to i32 (fp32 for FLOATS). As a launch does, pointers are taken 16-byte aligned, arguments named in
    `ones` are specialized to the constant 1 (a unit stride), and those in `aligned` taken as multiples of 16: the
    layouts, vector widths and so the registers Triton picks depend on both (the decode expand at BLOCK_N 256 took
    164 registers compiled without them, 85 with)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = types or {}
    names = fn.arg_names
    constexprs = constexprs | {name: 1 for name in ones}
    unknown = set(constexprs) - set(names) | set(types) - set(names) | set(aligned) - set(names)
    if unknown:
        raise ValueError(f"not parameters of {fn.__name__}: {unknown}")
    signature = {
        name: "constexpr" if name in constexprs else types.get(
            name, "*bf16" if name.endswith("_ptr") else "fp32" if name in FLOATS else "i32")
        for name in names
    }
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in names
             if name not in constexprs and (name.endswith("_ptr") or name in aligned)}
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def cubin_registers(cubin: bytes) -> int | None:
    """A one-kernel cubin's registers a thread (EIATTR_REGCOUNT in its ELF .nv.info sections), None if absent."""
    section_offset, = struct.unpack_from("<Q", cubin, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, section_offset + i * entry_size) for i in range(count)]
    names_at = sections[names_index][4]
    for name_at, _, _, _, offset, size, *_ in sections:
        name = cubin[names_at + name_at:cubin.index(b"\0", names_at + name_at)]
        if not name.startswith(b".nv.info"):
            continue
        data, at = cubin[offset:offset + size], 0
        while at + 4 <= size:
            form, attribute = data[at], data[at + 1]
            length = struct.unpack_from("<H", data, at + 2)[0] if form == _EIFMT_SVAL else 0
            if form == _EIFMT_SVAL and attribute == _EIATTR_REGCOUNT:
                return struct.unpack_from("<II", data, at + 4)[1]
            at += 4 + length
    return None


def resources(kernel, num_warps: int) -> dict:
    """Registers a thread, shared bytes a program, and the programs an SM holds by each (the smaller binds)."""
    registers = cubin_registers(kernel.asm["cubin"])
    shared = kernel.metadata.shared
    by_registers = SM90_REGISTERS // (registers * 32 * num_warps) if registers else None
    by_warps = SM90_MAX_WARPS // num_warps
    by_shared = SM90_SHARED_BYTES // shared if shared else by_warps
    return {"registers": registers, "shared_bytes": shared,
            "programs_per_sm": min(v for v in (by_registers, by_warps, by_shared) if v is not None)}


LORA_META = {"seg_starts_ptr": "*i32", "seg_slots_ptr": "*i32", "slot_offsets_ptr": "*i32",
             "slot_ranks_ptr": "*i32", "h_ptr": "*fp32"}
DECODE_META = {"src_ptr": "*fp32", "token_slots_ptr": "*i32", "slot_offsets_ptr": "*i32",
               "slot_ranks_ptr": "*i32", "h_ptr": "*fp32"}
DELTA_META = {name: kind for name, kind in DECODE_META.items() if name != "src_ptr"} | {"delta_ptr": "*fp32"}
# triton_glue._silu_mul_kernel with a pending LoRA delta (pending_lora.PendingLora)
FUSED_ACT_META = {name: kind for name, kind in DECODE_META.items() if name != "src_ptr"}
# and down_proj's shrink of its result (act_shrink)
SHRINK_META = {"h2_ptr": "*fp32", "slots2_ptr": "*i32", "slot2_offsets_ptr": "*i32", "slot2_ranks_ptr": "*i32"}


# How a decode step's launches specialize the LoRA kernels' integer arguments (compile_sm90's ones / aligned): x, A,
# B and y are contiguous; rows of 16-multiple widths (8B and 1B shapes, rank-16 pools).
_SHRINK_SPEC = {"ones": ("stride_xk", "stride_ak"), "aligned": ("in_features", "stride_xm", "stride_an", "stride_hm")}
_BOUNDS = ("bound1", "bound2", "bound3")
_EXPAND_SPEC = {"ones": ("stride_bn", "stride_yn"),
                "aligned": ("out_features", "stride_hm", "stride_br", "stride_ym", *_BOUNDS)}
_DECODE_SPEC = {"ones": ("stride_bn",), "aligned": ("out_features", "stride_hm", "stride_br", *_BOUNDS)}
_FUSED_ACT_SPEC = {"ones": ("stride_bn",), "aligned": ("inter", "stride_gu", "stride_out", "stride_hm", "stride_br")}
_SHRINK_ACT_SPEC = {"ones": ("stride_bn",), "aligned": (*_FUSED_ACT_SPEC["aligned"], "stride_a2", "stride_h2")}


def lora_decode_variants():
    """(label, kernel function, constexprs, types, num_warps, compile_sm90's ones and aligned) of a batch-32 decode
    step's LoRA launches (rank 16): the tile forms, and the one-row forms at LORAPLEX_LORA_ONE_ROW's width (256 when
    it is off), N / 256 warps for bf16 B as one_row_launch gives."""
    from server.kernels.glue import triton_glue
    from server.kernels.lora import triton_lora, triton_lora_decode

    shrink = triton_lora._shrink_kernel
    expand = triton_lora._expand_kernel
    sums = triton_lora_decode._expand_sums_kernel
    delta = triton_lora_decode._lora_delta_kernel
    width = triton_lora.ONE_ROW_BLOCK_N or 256
    found = []
    for cols, linear in ((64, "qkv"), (32, "gate_up"), (16, "o, down")):
        found.append((f"shrink {linear} (BLOCK_N {cols}, BLOCK_K 128, a program a token)", shrink,
                      {"BLOCK_M": 1, "BLOCK_N": cols, "BLOCK_K": 128, "ATOMIC": True, "DOT_PRECISION": "tf32",
                       "PDL": False},
                      LORA_META, 4, _SHRINK_SPEC))
    for rows, cols, warps in ((16, 256, 4), (1, width, width // 256)):
        form = "one row" if rows == 1 else "16-row tile"
        found.append((f"expand gate_up ({form}, BLOCK_N {cols})", expand,
                      {"BLOCK_M": rows, "BLOCK_N": cols, "BLOCK_R": 16, "NUM_SLICES": 2, "DOT_PRECISION": "tf32",
                       "PDL": False},
                      LORA_META, warps, _EXPAND_SPEC))
    for one_row, cols, warps in ((False, 256, 4), (True, width, width // 256)):
        form = "one row" if one_row else "tile"
        for slices, linear in ((3, "qkv"), (1, "o, down")):
            found.append((f"expand_sums {linear} ({form}, BLOCK_N {cols})", sums,
                          {"BLOCK_N": cols, "BLOCK_R": 16, "NUM_SLICES": slices, "HAS_BIAS": False,
                           "DOT_PRECISION": "tf32", "ONE_ROW": one_row, "PDL": False},
                          DECODE_META, warps, _DECODE_SPEC))
        found.append((f"side delta gate_up ({form}, BLOCK_N {cols})", delta,
                      {"BLOCK_N": cols, "BLOCK_R": 16, "NUM_SLICES": 2, "DOT_PRECISION": "tf32", "ONE_ROW": one_row,
                       "PDL": False},
                      DELTA_META, warps, _DECODE_SPEC))
    found.append((f"activation with gate_up's pending delta (one row, BLOCK {width})", triton_glue._silu_mul_kernel,
                  {"BLOCK": width, "SUMS": False, "HAS_BIAS": False, "MOST_SPLITS": 16, "HAS_DELTA": False,
                   "HAS_LORA": True, "BLOCK_R": 16, "SHRINK": False, "BLOCK_R2": 16, "PDL": False},
                  FUSED_ACT_META, width // 256,
                  _FUSED_ACT_SPEC))
    found.append((f"activation with gate_up's pending delta and down's shrink (one row, BLOCK {width})",
                  triton_glue._silu_mul_kernel,
                  {"BLOCK": width, "SUMS": False, "HAS_BIAS": False, "MOST_SPLITS": 16, "HAS_DELTA": False,
                   "HAS_LORA": True, "BLOCK_R": 16, "SHRINK": True, "BLOCK_R2": 16, "PDL": False},
                  FUSED_ACT_META | SHRINK_META, width // 256,
                  _SHRINK_ACT_SPEC))
    return found


def main() -> None:
    for label, fn, constexprs, types, num_warps, spec in lora_decode_variants():
        found = resources(compile_sm90(fn, constexprs, types, num_warps, **spec), num_warps)
        print(f"{label:50s} {num_warps} warps: {found['registers']} registers, {found['shared_bytes']} B shared, "
              f"{found['programs_per_sm']} programs an SM")


if __name__ == "__main__":
    main()
