"""bench/RESULTS.md's serving part: prefill-step profiles apart from the decode-step table, sampler profiles in their
own, issue 13's targets each from the newest GPU run that measured it."""

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


def test_sampler_profiles_get_their_own_table(tmp_path):
    """A bench.sampler_profile run (the newest ones written by `python -m bench.sampler_profile` on the CPU here) is
    no decode-step profile: it has its own table of device / host microseconds by kind of draw."""
    from bench.sampler_profile import main

    assert main(["--device", "cpu", "--vocab", "512", "--rows", "4", "--repeats", "2", "--out", str(tmp_path)]) == 0
    (written,) = tmp_path.glob("*-sampler-profile.json")
    results = json.loads(written.read_text())["results"]
    assert set(results) == {f"{s}/{k}" for s in ("flat", "peaked") for k in ("greedy", "temperature", "top_p")}
    assert all(row["synced_us"] >= row["host_launch_us"] > 0 for row in results.values())
    lines = serving_section(tmp_path)
    rows = [line for line in lines if line.startswith(f"| `{written.name}`")]
    assert len(rows) == 1 and rows[0].count("/") == 6  # six cells of device / host
    assert not any("step ms (GPU)" in line for line in lines)  # no decode-step table for it


def test_serving_targets_take_each_ratio_from_the_newest_gpu_run_that_measured_it(tmp_path):
    from bench.report_serving import serving_targets

    def write(name, date, ratios):
        (tmp_path / name).write_text(json.dumps({"date": date, "timestamp": f"{date}T00:00:00", "ratios": ratios}))

    write("2026-12-01-nvidia-h200-serve-c32-1b-old.json", "2026-12-01", {"serve_over_engine_1b_c32": 0.5})
    write("2026-12-02-nvidia-h200-serve-c32-1b-new.json", "2026-12-02", {"serve_over_engine_1b_c32": 0.93,
                                                                          "sampled_over_greedy_1b_c32": None})
    write("2026-12-03-cpu-serve-c32-1b-smoke.json", "2026-12-03", {"serve_over_engine_1b_c32": 0.1})  # not a GPU
    write("2026-12-01-nvidia-h200-serve-lora-modes-1b.json", "2026-12-01", {"auto_over_best_zipf_1b": 0.99})
    rows = {line.split(" | ")[0].strip("| `"): line for line in serving_targets(tmp_path) if line.startswith("| `")}
    assert "| 0.93 | yes | `results/2026-12-02-nvidia-h200-serve-c32-1b-new.json` |" in rows["serve_over_engine_1b_c32"]
    assert "| 0.99 | **no** |" in rows["auto_over_best_zipf_1b"]
    assert rows["sampled_over_greedy_1b_c32"].endswith("| — | — | — |")  # measured by no run
