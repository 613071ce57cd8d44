"""The loops of compiled CUDA kernels, instruction by instruction, on a machine without a GPU.

    python -m bench.sass_loops OBJECT_OR_CUBIN [--kernel SUBSTRING] [--all] [--order]

Disassembles with cuobjdump (which needs nvdisasm beside it or on PATH) and prints, for each kernel whose mangled
name contains SUBSTRING, every backward branch's loop: its instruction count and the opcodes that matter to the NF4
kernels (the tensor-core MMAs, the shared loads, the fp32 multiplies, the spills), with --all each loop's whole opcode
histogram. Neither tool ships with the CPU machine's nvcc; both come from PyPI as wheels (no GPU needed):
``pip download --no-deps nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm``, unzip, and put their ``nvidia/cu13/bin`` on
PATH. An object comes from ``nvcc -gencode arch=compute_90a,code=sm_90a -c`` (for server/kernels/nf4/csrc/nf4_*.cu the
torch and Python include flags too, and ``-DTORCH_EXTENSION_NAME=x``). Used to count the per-pair dequantization
instructions of the byte-pair table (thirty-third session: 5 a pair in SASS against the 16-entry table's 8).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import textwrap

KEY_OPS = ("HMMA", "HGMMA", "LDS", "FMUL", "PRMT", "F2FP", "LDL", "STL", "BAR")
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,6})\*/\s+(.*?)\s*;")
_BACKWARD = re.compile(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)")


def opcode(text: str) -> str:
    """The opcode of one SASS instruction, its predicate and modifiers dropped (``@!P0 LDS.64 R2, [R3]`` -> LDS)."""
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def kernels(sass: str) -> dict[str, list[tuple[int, str]]]:
    """{mangled kernel name: [(address, instruction)]} of cuobjdump -sass output."""
    out = {}
    for part in re.split(r"\n\s*Function : ", sass)[1:]:
        name = part.split("\n", 1)[0].strip()
        out[name] = [(int(m.group(1), 16), m.group(2)) for m in _INSTRUCTION.finditer(part)]
    return out


def loops(instructions: list[tuple[int, str]]) -> list[tuple[int, int, collections.Counter]]:
    """(start, end, opcode counts) of every loop: the instructions from a backward branch's target to the branch."""
    out = []
    for address, text in instructions:
        match = _BACKWARD.search(text)
        if match and int(match.group(1), 16) < address:
            start = int(match.group(1), 16)
            body = [t for a, t in instructions if start <= a <= address]
            out.append((start, address, collections.Counter(opcode(t) for t in body)))
    return out


def sequence(instructions: list[tuple[int, str]], start: int, end: int) -> list[str]:
    """The opcodes from address start to end in program order: where a loop's loads sit against their first use (the
    thirty-fourth session found x's loads two instructions before each step's first MMA this way)."""
    return [opcode(t) for a, t in instructions if start <= a <= end]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("object")
    parser.add_argument("--kernel", default="")
    parser.add_argument("--all", action="store_true", help="each loop's whole opcode histogram")
    parser.add_argument("--order", action="store_true", help="each loop's opcodes in program order")
    args = parser.parse_args()
    sass = subprocess.run(["cuobjdump", "-sass", args.object], check=True, capture_output=True, text=True).stdout
    for name, instructions in kernels(sass).items():
        if args.kernel not in name:
            continue
        print(f"{name}: {len(instructions)} instructions")
        for start, end, ops in loops(instructions):
            key = ", ".join(f"{op} {ops[op]}" for op in KEY_OPS if ops[op])
            print(f"  loop {start:#x}-{end:#x}: {sum(ops.values())} instructions; {key}")
            if args.all:
                print("    " + ", ".join(f"{op} {n}" for op, n in ops.most_common()))
            if args.order:
                print(textwrap.fill(" ".join(sequence(instructions, start, end)), 116, initial_indent="    ",
                                    subsequent_indent="    "))


if __name__ == "__main__":
    main()
