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


def paired_ratio_bootstrap(a, b, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> dict:
    """Ratio of two arms' mean scores, mean(a) / mean(b), with a bootstrap interval: the cases (the same ones in
    both tables) are drawn once per resample for both arms, each arm's seeds are drawn on their own.

    Args:
        a, b: seeds × cases tables (one list per seed; the cases in the same order in both tables).

    Returns:
        {"ratio", "low", "high"}.
    """
    import numpy as np
    ma, mb = np.asarray(a, float), np.asarray(b, float)
    if ma.ndim != 2 or mb.ndim != 2 or ma.shape[1] != mb.shape[1] or not ma.size or not mb.size:
        raise ValueError("paired_ratio_bootstrap needs two non-empty seeds × cases tables over the same cases")
    rng = np.random.default_rng(seed)
    ci = rng.integers(0, ma.shape[1], (n_boot, ma.shape[1]))
    sa, sb = rng.integers(0, ma.shape[0], (n_boot, ma.shape[0])), rng.integers(0, mb.shape[0], (n_boot, mb.shape[0]))
    boots = np.array([np.nanmean(ma[np.ix_(x, c)]) / np.nanmean(mb[np.ix_(y, c)]) for x, y, c in zip(sa, sb, ci)])
    low, high = np.nanpercentile(boots, [50 * (1 - level), 50 * (1 + level)])
    return {"ratio": float(np.nanmean(ma) / np.nanmean(mb)), "low": float(low), "high": float(high)}


def case_score(case: dict, key: str) -> float:
    """One case's score in a study row; ``dice_tumor_lits`` (LiTS: every case, a tumour-free case 1 without
    predicted tumour and 0 with any) and ``dice_tumor_all_cases`` (nnU-Net: a tumour-free case 0 with predicted
    tumour, NaN without) derived from the row where it was scored before those keys existed."""
    if key in case:
        return case[key]
    if case["has_tumor"] and key in ("dice_tumor_lits", "dice_tumor_all_cases"):
        return case["dice_tumor"]
    if key == "dice_tumor_lits":
        return float(case["pred_tumor_ml"] == 0)
    if key == "dice_tumor_all_cases":  # nnU-Net: a tumour-free case left out unless tumour was predicted
        return 0.0 if case["pred_tumor_ml"] > 0 else float("nan")
    return case[key]


def seeds_by_cases(rows: list[dict], key: str) -> tuple[list[list[float]], list[str]]:
    """A seeds × cases table of one per-case score from an arm's rows (one row per seed, ``per_case`` a list of
    dicts with "case"), over the cases every seed scored; ``dice_tumor`` on the cases with tumour only.

    Returns:
        (table, the cases in its column order).
    """
    keep = [{c["case"]: case_score(c, key) for c in r["per_case"] if key != "dice_tumor" or c["has_tumor"]}
            for r in sorted(rows, key=lambda r: r["seed"])]
    cases = sorted(set.intersection(*(set(k) for k in keep))) if keep else []
    return [[k[c] for c in cases] for k in keep], cases


def any_overlap(summary: dict, key: str) -> float:
    """``summary[key]``, a lesion rate taken with any-overlap detection: ``<key>_any_overlap`` where the summary has
    LiTS's IoU rule beside it, else ``key`` itself (summaries before 2026-12-04 counted any overlap as found), so
    that old and new rows in one table mean the same. Keys without an any-overlap form are returned as they are."""
    return summary.get(f"{key}_any_overlap", summary[key])
