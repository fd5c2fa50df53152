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


def hierarchical_bootstrap(values, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of a seeds × cases table of scores (or paired differences) with a bootstrap interval that resamples
    the training seeds and the cases, each independently with replacement, so that it holds the noise of
    training as well as that of the cases (two runs of one recipe then differ "within noise").

    Args:
        values: one list per seed, the cases in the same order in each.

    Returns:
        {"mean", "low", "high", "seeds", "cases"}.
    """
    import numpy as np
    m = np.asarray(values, float)
    if m.ndim != 2 or not m.size:
        raise ValueError("hierarchical_bootstrap needs a non-empty seeds × cases table")
    rng = np.random.default_rng(seed)
    si = rng.integers(0, m.shape[0], (n_boot, m.shape[0]))
    ci = rng.integers(0, m.shape[1], (n_boot, m.shape[1]))
    boots = np.array([np.nanmean(m[np.ix_(s, c)]) for s, c in zip(si, ci)])
    low, high = np.nanpercentile(boots, [50 * (1 - level), 50 * (1 + level)])
    return {"mean": float(np.nanmean(m)), "low": float(low), "high": float(high), "seeds": m.shape[0],
            "cases": m.shape[1]}
