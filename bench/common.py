"""Shared helpers of the benchmarks: machine facts, median timing, rewriting tables in BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
WORK = ROOT / "bench" / "_work"  # generated data and caches (git-ignored)
BENCHMARKS = ROOT / "BENCHMARKS.md"

import torch  # noqa: E402


def machine() -> str:
    """One line: CPU model, cores, torch version and threads (and GPU when present)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads){gpu}"


def stamp(command: str) -> str:
    """The provenance line put above every table."""
    return f"_Measured {datetime.date.today().isoformat()} on {machine()}; command: `{command}`._"


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 0) -> tuple[float, list[float]]:
    """Median wall time of ``fn`` over ``repeats`` runs (after ``warmup`` untimed runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def write_table(name: str, markdown: str, path: Path = BENCHMARKS) -> None:
    """Replace the block between ``<!-- name:start -->`` and ``<!-- name:end -->`` (append it if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _m: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n{block}\n"
    path.write_text(text)


def md_table(header: list[str], rows: list[list[object]]) -> str:
    """A markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
