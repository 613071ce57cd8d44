"""bench.slim_wheels keeps a wheel installable: the dropped libraries leave its RECORD too."""

from __future__ import annotations

import zipfile

from bench.slim_wheels import keeps, slim


def test_slim_keeps_the_cpu_and_cuda13_libraries_and_the_record_agrees(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.0.0-py3-none-any.whl"
    members = ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so",
               "bitsandbytes/libbitsandbytes_cuda118.so", "bitsandbytes/libbitsandbytes_cuda130.so",
               "bitsandbytes/libbitsandbytes_cuda132.so", "bitsandbytes/libbitsandbytes_rocm64.so",
               "bitsandbytes/libbitsandbytes_xpu2025.so"]
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in members:
            archive.writestr(name, b"x" * 1000)
        archive.writestr("bitsandbytes-0.0.0.dist-info/RECORD", "\n".join(f"{m},sha256=0,1000" for m in members))
    slim(wheel, ("cpu", "cuda13"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        record = archive.read("bitsandbytes-0.0.0.dist-info/RECORD").decode()
    kept = {"bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so",
            "bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_cuda132.so"}
    assert names == kept | {"bitsandbytes-0.0.0.dist-info/RECORD"}
    assert {line.split(",")[0] for line in record.splitlines() if line} == kept


def test_keeps():
    assert keeps("bitsandbytes/nn/modules.py", ("cpu",))
    assert not keeps("bitsandbytes/libbitsandbytes_cuda126.so", ("cpu", "cuda13"))
