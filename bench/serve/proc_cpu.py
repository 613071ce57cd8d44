"""CPU seconds the server's processes spent over a load, thread by thread (Linux /proc).

A stream's client-side TTFT on the H200 (c32, 1B) was 25 ms at p50 while the engine's own arrival to first
token was 7 ms: the rest queued in the API process, where one event loop and the engine client's receiver
thread share one GIL. Whether that process is saturated is a question of CPU time over wall time, for its
main thread (the event loop) and its other threads (the receiver, zmq's I/O thread, tokenizers' pool)
apart, and the same for the engine process. Threads are keyed `<pid>/<tid>`; a thread's name is its
`comm` (Python threads all read `python` unless named at the OS level)."""

from __future__ import annotations

import os
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _thread_seconds(stat_path: Path) -> float | None:
    try:
        text = stat_path.read_text()
    except OSError:  # the thread ended between the listing and the read
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state is fields[0]
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14 and 15 of stat)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _cmdline(pid: int, limit: int = 60) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:limit]
    except OSError:
        return "?"


def _leads_its_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except OSError:
        return False


def snapshot(pid: int) -> dict[str, dict]:
    """{"<pid>/<tid>": {"process": role, "comm": name, "cpu_s": seconds}} for `pid` (role "api") and its
    descendants (role "api <pid>" for the API processes of `--api-server-count N`, which lead process groups
    of their own, else "child <pid>: <its command line's start>"); empty where /proc is missing."""
    threads: dict[str, dict] = {}
    todo = [(pid, "api")]
    while todo:
        proc, role = todo.pop()
        for task in Path(f"/proc/{proc}/task").glob("*"):
            seconds = _thread_seconds(task / "stat")
            if seconds is None:
                continue
            try:
                comm = (task / "comm").read_text().strip()
            except OSError:
                comm = "?"
            threads[f"{proc}/{task.name}"] = {"process": role, "main": task.name == str(proc), "comm": comm,
                                              "cpu_s": seconds}
        todo += [(child, f"api {child}" if _leads_its_group(child) else f"child {child}: {_cmdline(child)}")
                 for child in _children(proc)]
    return threads


def deltas(before: dict[str, dict], after: dict[str, dict], wall_s: float, top: int = 4) -> dict:
    """Per process: the main thread's and the other threads' CPU seconds over the load and as a fraction
    of its wall time, and the busiest other threads."""
    by_process: dict[str, dict] = {}
    for key, thread in after.items():
        spent = thread["cpu_s"] - before.get(key, {"cpu_s": 0.0})["cpu_s"]
        entry = by_process.setdefault(thread["process"], {"main_cpu_s": 0.0, "other_cpu_s": 0.0, "others": []})
        if thread["main"]:
            entry["main_cpu_s"] += spent
        else:
            entry["other_cpu_s"] += spent
            entry["others"].append((round(spent, 3), thread["comm"], key))
    for entry in by_process.values():
        entry["others"] = sorted(entry["others"], reverse=True)[:top]
        entry["main_busy"] = entry["main_cpu_s"] / wall_s if wall_s > 0 else None
        entry["all_busy"] = (entry["main_cpu_s"] + entry["other_cpu_s"]) / wall_s if wall_s > 0 else None
        entry["main_cpu_s"], entry["other_cpu_s"] = round(entry["main_cpu_s"], 3), round(entry["other_cpu_s"], 3)
    return by_process
