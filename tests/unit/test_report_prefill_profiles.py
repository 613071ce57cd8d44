"""bench/RESULTS.md keeps prefill-step profiles out of the decode-step table and in their own."""

import json

from bench.report_serving import serving_section


def test_prefill_profiles_get_their_own_table(tmp_path):
    decode = {"total_ms_per_step": 1.3, "glue_fraction": 0.1, "ms_per_step": {"nf4_matmul": 0.9}}
    prefill = {"step": "prefill", "mode": "mixed32", "prefill_step_wall_ms": [61.7, 58.2], "total_ms_per_step": 33.5,
               "ms_per_step": {"lora": 10.4, "nf4_matmul": 5.9}}
    (tmp_path / "2026-12-02-x-1b-b32-merged-profile.json").write_text(json.dumps(decode))
    (tmp_path / "2026-12-02-x-8b-b32-mixed32-prefill-profile.json").write_text(json.dumps(prefill))
    lines = serving_section(tmp_path)
    decode_rows = [line for line in lines if line.startswith("| `") and "merged-profile" in line]
    prefill_rows = [line for line in lines if line.startswith("| `") and "prefill-profile" in line]
    assert len(decode_rows) == 1 and "| 1.3 |" in decode_rows[0]
    assert prefill_rows == ["| `2026-12-02-x-8b-b32-mixed32-prefill-profile.json` | mixed32 | 61.7 / 58.2 | 33.5 | "
                            "10.4 | 5.9 | — |"]
