"""bench.report builds RESULTS.md from result files: the ratio table, latest file per model, raw rows."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.report import build_report, load_latest
from bench.results import ENGINE_KEYS, RATIO_KEYS, derive

SHAPE_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_layers": 32, "num_heads": 32,
            "num_kv_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False}


def _gen(tokens_per_s: float, step_ms: float | None = None, batch: int = 32) -> dict:
    return {"batch": batch, "max_tokens": 128, "tokens_per_s": tokens_per_s, "decode_step_ms_median": step_ms,
            "mean_context": 192.0}


def fake_8b(timestamp: str, mixed32: float) -> dict:
    data = {
        "model": "8b", "date": timestamp[:10], "timestamp": timestamp, "device": "NVIDIA H100 80GB HBM3",
        "versions": {"torch": "2.11"}, "config": {"shape": SHAPE_8B},
        "bandwidth": {"gbps_best": 3000.0, "gbps_median": 2900.0, "copy_bytes": 2 << 30},
        "ours": {
            "base_b1": _gen(200.0, 4.0, batch=1), "merged1_b32": _gen(4000.0, 8.0),
            "mixed32_b32": _gen(mixed32, 10.0), "swap": {"swap_ms_median": 100.0, "bit_exact": True},
            "ctx128_b32": _gen(0.0, 5.0), "ctx2048_b32": _gen(0.0, 10.0),
            "unmerged1_b1": {"error": "RuntimeError: boom"},
        },
        "baseline": {"hf_b1": {"batch": 1, "new_tokens": 64, "tokens_per_s": 20.0},
                     "peft_merged_b32": {"merge_s": 1.5, "unmerge_s": 1.5, "merge_unmerge_s": 3.0}},
    }
    derive(data)
    return data


def fake_1b() -> dict:
    data = {"model": "1b", "date": "2026-11-24", "timestamp": "2026-11-24T10:00:00+00:00", "device": "H100",
            "ours": {"mixed32_b32": _gen(3000.0, 9.0)},
            "baseline": {"peft_mixed32_b32": {"batch": 32, "new_tokens": 16, "tokens_per_s": 40.0}}}
    derive(data)
    return data


def _write(directory: Path, name: str, data: dict) -> None:
    (directory / name).write_text(json.dumps(data))


def test_derive_computes_the_eight_ratios():
    ratios = fake_8b("2026-11-24T10:00:00+00:00", 3600.0)["ratios"]
    assert set(ratios) == set(RATIO_KEYS) | set(ENGINE_KEYS)
    assert ratios["b1_tokens_per_s_8b"] == 200.0
    assert ratios["mixed32_over_merged_8b"] == 0.9
    assert ratios["vs_hf_b1_8b"] == 10.0
    assert ratios["swap_ms_8b"] == 100.0
    assert ratios["swap_speedup_vs_peft_8b"] == 30.0
    assert ratios["swap_bit_exact"] is True
    assert ratios["ctx128_over_ctx2048_8b"] == 0.5
    assert ratios["vs_peft_mixed32_1b"] is None  # belongs to the 1b file
    # 3.63e9 NF4 + 1.05e9 head + 0.81e9 KV bytes at 3000 GB/s = 1.83 ms of a measured 8 ms step
    assert 0.2 < ratios["roofline_fraction_merged_b32_8b"] < 0.25
    assert fake_1b()["ratios"]["vs_peft_mixed32_1b"] == 75.0


def test_report_takes_each_ratio_from_the_latest_file_of_its_model(tmp_path):
    _write(tmp_path, "2026-11-23-h100-8b.json", fake_8b("2026-11-23T10:00:00+00:00", 1000.0))
    _write(tmp_path, "2026-11-24-h100-8b.json", fake_8b("2026-11-24T10:00:00+00:00", 3600.0))
    _write(tmp_path, "2026-11-24-h100-1b.json", fake_1b())
    _write(tmp_path, "2026-11-25-h100-8b-quick.json", dict(fake_8b("2026-11-25T10:00:00+00:00", 1.0), quick=True))
    _write(tmp_path, "2026-11-24-cpu-tiny.json", {"model": "tiny", "timestamp": "2026-11-25"})

    latest = load_latest(tmp_path)
    assert sorted(latest) == ["1b", "8b"]
    assert latest["8b"][0] == "2026-11-24-h100-8b.json"

    text = build_report(tmp_path)
    rows = {line.split("|")[1].strip(" `"): [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith("| `")}
    assert set(rows) == set(RATIO_KEYS)
    assert rows["mixed32_over_merged_8b"][3:6] == ["0.9", "yes", "`results/2026-11-24-h100-8b.json`"]
    assert rows["vs_peft_mixed32_1b"][3:6] == ["75", "**no**", "`results/2026-11-24-h100-1b.json`"]
    assert rows["swap_bit_exact"][2:5] == ["true", "true", "yes"]
    assert rows["ctx128_over_ctx2048_8b"][2:5] == ["<= 0.6", "0.5", "yes"]
    assert "No GPU run yet" not in text
    assert "| ours | unmerged1_b1 |" in text and "error: RuntimeError: boom" in text
    assert "| baseline | hf_b1 | 20 |" in text


def test_report_without_results_says_no_gpu_run(tmp_path):
    text = build_report(tmp_path)
    assert "No GPU run yet" in text
    assert text.count("| — | — | — |") == len(RATIO_KEYS)


def test_a_ratio_missing_from_the_newest_run_comes_from_the_newest_run_that_has_it(tmp_path):
    older = fake_8b("2026-11-24T09:00:00+00:00", 3600.0)
    newer = fake_8b("2026-11-24T10:00:00+00:00", 3200.0)
    newer["ratios"]["swap_speedup_vs_peft_8b"] = None  # the newer run skipped PEFT's merge
    _write(tmp_path, "old-8b.json", older)
    _write(tmp_path, "new-8b.json", newer)
    rows = {line.split("|")[1].strip(" `"): line for line in build_report(tmp_path).splitlines()
            if line.startswith("| `")}
    assert "new-8b.json" in rows["mixed32_over_merged_8b"] and "0.8 " in rows["mixed32_over_merged_8b"]
    assert "old-8b.json" in rows["swap_speedup_vs_peft_8b"] and "| 30 |" in rows["swap_speedup_vs_peft_8b"]


def test_an_h200_run_outranks_a_newer_run_of_another_card_for_the_ratios_it_measured(tmp_path):
    h200 = fake_8b("2026-11-24T09:00:00+00:00", 3600.0)
    h200["device"] = "NVIDIA H200"
    h200["ratios"]["swap_speedup_vs_peft_8b"] = None  # only the H100 run measured PEFT's merge
    _write(tmp_path, "h200-8b.json", h200)
    _write(tmp_path, "h100-8b.json", fake_8b("2026-11-24T10:00:00+00:00", 3200.0))
    rows = {line.split("|")[1].strip(" `"): line for line in build_report(tmp_path).splitlines()
            if line.startswith("| `")}
    assert "h200-8b.json" in rows["mixed32_over_merged_8b"] and "| 0.9 |" in rows["mixed32_over_merged_8b"]
    assert "h100-8b.json" in rows["swap_speedup_vs_peft_8b"]
    assert load_latest(tmp_path)["8b"][0] == "h200-8b.json"


def test_a_kernel_run_that_records_its_time_outranks_an_older_plain_one_of_the_same_date(tmp_path):
    """Kernel files of one date: the plain -kernels.json used to rank first whatever ran later; a run that writes
    its timestamp (bench.results.write_named_result) now ranks by it, and files without one count as older."""
    from bench.report_kernels import kernel_runs, newest_with_ratios

    def kernels(m1: float, timestamp: str | None) -> dict:
        data = {"date": "2026-12-02", "device": "NVIDIA H200", "layers": [], "ratios": {"nf4_over_bf16_m1": m1}}
        if timestamp:
            data["timestamp"] = timestamp
        return data

    _write(tmp_path, "2026-12-02-nvidia-h200-kernels.json", kernels(0.7, None))
    _write(tmp_path, "2026-12-02-nvidia-h200-kernels-a.json", kernels(0.6, "2026-12-02T10:00:00+00:00"))
    _write(tmp_path, "2026-12-02-nvidia-h200-kernels-b.json", kernels(0.5, "2026-12-02T09:00:00+00:00"))
    order = [name for name, _ in kernel_runs(tmp_path)]
    assert order == ["2026-12-02-nvidia-h200-kernels-a.json", "2026-12-02-nvidia-h200-kernels-b.json",
                     "2026-12-02-nvidia-h200-kernels.json"]
    assert newest_with_ratios(tmp_path, "*-kernels*.json")[0] == "2026-12-02-nvidia-h200-kernels-a.json"


def test_named_results_record_when_they_were_written(tmp_path):
    from bench.results import write_named_result

    path = write_named_result(tmp_path, {"date": "2026-12-02", "device": "NVIDIA H200", "ratios": {}}, "kernels")
    assert json.loads(path.read_text())["timestamp"].startswith("20")


def test_an_ab_run_of_another_setting_never_stands_for_a_target(tmp_path):
    """A newer run marked "ab" (e.g. --prefill-hold-steps=16, whose slow greedy load flattered sampled / greedy) is
    passed over for the newest run of the default settings."""
    from bench.report_kernels import newest_with_ratios

    def serve(ratio: float, timestamp: str, ab: str | None = None) -> dict:
        data = {"date": "2026-12-04", "timestamp": timestamp, "ratios": {"sampled_over_greedy_1b_c32": ratio}}
        return {**data, "ab": ab} if ab else data

    _write(tmp_path, "2026-12-04-nvidia-h200-serve-c32-1b-a.json", serve(0.93, "2026-12-04T10:00:00+00:00"))
    _write(tmp_path, "2026-12-04-nvidia-h200-serve-c32-1b-b.json",
           serve(0.96, "2026-12-04T11:00:00+00:00", ab="--prefill-hold-steps=16"))
    name, data = newest_with_ratios(tmp_path, "*-serve-c32-*.json", "sampled_over_greedy_1b_c32", gpu_only=True)
    assert name.endswith("-a.json") and data["ratios"]["sampled_over_greedy_1b_c32"] == 0.93


def test_an_ab_run_never_stands_for_a_target(tmp_path):
    """A newer run of a non-default setting ("ab", which bench.results.Recorder writes for LORAPLEX_ variables)
    leaves each ratio to the newest default run (the issue-6 table; the kernels issue's engine rows skip it alike)."""
    older = fake_8b("2026-11-24T09:00:00+00:00", 3600.0)
    newer = fake_8b("2026-11-24T10:00:00+00:00", 3200.0)
    newer["ab"] = "LORAPLEX_LORA_SIDE_EXPAND=2"
    older_name, newer_name = "2026-11-24-nvidia-h200-8b-old.json", "2026-11-24-nvidia-h200-8b-ab.json"
    _write(tmp_path, older_name, older)
    _write(tmp_path, newer_name, newer)
    rows = [line for line in build_report(tmp_path).splitlines() if line.startswith("| `mixed32_over_merged_8b`")]
    assert rows and all(older_name in row and newer_name not in row for row in rows)


def test_recorder_marks_a_run_with_loraplex_variables_as_ab(tmp_path, monkeypatch):
    from bench.results import Recorder, ab_settings

    assert ab_settings({"LORAPLEX_TRITON_INTERPRET": "1", "PATH": "/bin"}) is None
    assert ab_settings({"LORAPLEX_NF4_AUTOTUNE": "1", "LORAPLEX_STEP_TRACE": "/t"}) == (
        "LORAPLEX_NF4_AUTOTUNE=1 LORAPLEX_STEP_TRACE=/t")
    for name in [n for n in os.environ if n.startswith("LORAPLEX_")]:
        monkeypatch.delenv(name)
    assert "ab" not in Recorder(tmp_path / "plain.json", {}, 10.0).data
    monkeypatch.setenv("LORAPLEX_LORA_SIDE_EXPAND", "1")
    rec = Recorder(tmp_path / "ab.json", {}, 10.0)
    assert rec.data["ab"] == "LORAPLEX_LORA_SIDE_EXPAND=1"
    assert json.loads((tmp_path / "ab.json").read_text())["ab"] == "LORAPLEX_LORA_SIDE_EXPAND=1"


def test_the_raw_figures_come_from_the_newest_whole_run_of_the_default_settings(tmp_path):
    whole = fake_8b("2026-11-24T09:00:00+00:00", 3600.0)
    cut = fake_8b("2026-11-24T10:00:00+00:00", 3200.0)
    cut["ours"]["mixed32_b32"] = {"skipped": "time budget: 10 s left, needs about 10 s"}
    a_b = dict(fake_8b("2026-11-24T11:00:00+00:00", 3000.0), ab="LORAPLEX_DECODE_TUNING=num_warps=4")
    _write(tmp_path, "whole-8b.json", whole)
    _write(tmp_path, "cut-8b.json", cut)
    _write(tmp_path, "ab-8b.json", a_b)
    assert load_latest(tmp_path)["8b"][0] == "whole-8b.json"
    assert "### 8b shape — `results/whole-8b.json`" in build_report(tmp_path)
    (tmp_path / "whole-8b.json").unlink()
    assert load_latest(tmp_path)["8b"][0] == "cut-8b.json"  # a cut run of the defaults before any A/B
    (tmp_path / "cut-8b.json").unlink()
    assert load_latest(tmp_path)["8b"][0] == "ab-8b.json"
