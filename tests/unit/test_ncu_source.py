"""bench.ncu_source on the committed ncu source page of the thirty-seventh session (8B gate_up: gemv_pairs at one row,
wgmma at 32 rows, two launches each, every launch profiled twice over): the launches, their stall totals and the
instruction the session's finding rests on."""

from pathlib import Path

from bench import ncu_source

PAGE = (Path(__file__).resolve().parents[2] / "bench" / "results"
        / "2026-12-06-nvidia-h100-80gb-hbm3-ncu-s37-source-m1-m32.csv.gz")


def test_reads_every_launch_of_the_page():
    launches = ncu_source.kernels(PAGE)
    names = [name for name, _, _ in launches]
    assert len(launches) == 8
    assert all("nf4_gemv_pairs_kernel" in name for name in names[:4])
    assert all("nf4_wgmma_kernel" in name for name in names[4:])
    assert all(len(lines) > 500 and len(header) > 40 for _, header, lines in launches)


def test_summary_names_the_one_row_kernels_waiting_mma():
    _, header, lines = ncu_source.kernels(PAGE)[0]
    first, top = ncu_source.summary(header, lines, top=1)
    assert first.split()[0].isdigit() and "long_sb" in first
    index, share, *rest = top.split()
    assert "HMMA" in top and "long_sb" in top and float(share) > 0.2
    assert any(str(index) == line.split()[0] for line in ncu_source.around(header, lines, int(index), span=5))
