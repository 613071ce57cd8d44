"""The baseline side of a run: HF generate on the NF4 model, then PEFT on top of it, slowest last."""

from __future__ import annotations

import time
from typing import Any

from bench.baseline import (
    add_adapters,
    measure_generate,
    measure_peft_merged,
    measure_peft_mixed,
    measure_peft_unmerged,
    prompts,
    wrap_peft,
)
from bench.plan import Plan
from bench.results import Recorder


def run_baseline(rec: Recorder, state: dict, plan: Plan, vocab_size: int, device) -> None:
    hf, adapters = state["hf"], state["adapters"]
    tokens, needs = plan.baseline_tokens, plan.needs_s
    ids1 = prompts(vocab_size, 1, plan.prompt_len, device)
    ids32 = prompts(vocab_size, 32, plan.prompt_len, device)

    rec.measure("baseline", "hf_b1", lambda: measure_generate(hf, ids1, tokens["hf_b1"], device), needs["hf"])
    rec.measure("baseline", "hf_b32", lambda: measure_generate(hf, ids32, tokens["hf_b32"], device), needs["hf"])

    holder: dict[str, Any] = {}

    def setup() -> dict:
        began = time.perf_counter()
        holder["peft"] = wrap_peft(hf, adapters[0])
        return {"adapters": 1, "seconds": time.perf_counter() - began}

    rec.measure("baseline", "peft_setup", setup, needs["hf"])
    peft = holder.get("peft")
    if peft is None:
        return
    rec.measure("baseline", "peft_merged_b32",
                lambda: measure_peft_merged(peft, adapters[0], ids32, tokens["peft_merged_b32"], device),
                needs["peft_merged_b32"])
    rec.measure("baseline", "peft_unmerged1_b32",
                lambda: measure_peft_unmerged(peft, adapters[0], ids32, tokens["peft_unmerged1_b32"], device),
                needs["hf"])
    for count in (8, 32):
        refs = adapters[:count]

        def add(refs=refs) -> dict:
            began = time.perf_counter()
            added = add_adapters(peft, refs)
            return {"added": added, "seconds": time.perf_counter() - began}

        rec.measure("baseline", f"peft_add_adapters_{count}", add, needs["peft_mixed"])
        name = f"peft_mixed{count}_b32"
        rec.measure("baseline", name,
                    lambda refs=refs, name=name: measure_peft_mixed(peft, refs, ids32, tokens[name], device),
                    needs["peft_mixed"])
