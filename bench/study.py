"""The studies' shared library: results files, summaries of seeds, paired comparisons of arms.

Used by ``tumour_study.py`` (synthetic tumour arms), ``real_liver.py`` (recipes on the real liver slices) and
``lits_conventions.py`` (the stored studies rescored in LiTS's conventions). The product (``unet_helpers``) never
imports it.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
from common import case_score, hierarchical_bootstrap

import unet_helpers as uh


def load(path: Path) -> list[dict]:
    """The rows stored at ``path`` (none when the file does not exist yet)."""
    return json.loads(path.read_text()) if path.exists() else []


def save(rows: list[dict], path: Path) -> None:
    """Store rows atomically (NaN as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    uh.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(uh.json_safe(rows), indent=1)))


def mean_sd(vals: list[float | None]) -> str:
    """'mean ± sample sd' of the non-missing values ('-' when there are none, the value alone when one)."""
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"


def paired(rows: list[dict], arm_a: str, arm_b: str, key: str = "dice_tumor", n_boot: int = 10000,
           seed: int = 0) -> dict | None:
    """Paired difference A − B of a per-case score: same seeds, same cases.

    The 95 % interval resamples the seeds and the cases (``common.hierarchical_bootstrap``), so that it holds
    the noise of training as well as that of the cases: two runs of one recipe differ within it. Tumour Dice
    (``dice_tumor``) uses only the cases with tumour; every other key every case.

    Returns:
        The bootstrap's mean, low, high, seeds and cases, plus how many cases A and B each did better on; None
        when the arms share no case.
    """
    def by(arm):
        return {(r["seed"], c["case"]): case_score(c, key) for r in rows if r["arm"] == arm for c in r["per_case"]
                if key != "dice_tumor" or c["has_tumor"]}
    a, b = by(arm_a), by(arm_b)
    both = set(a) & set(b)
    seeds = sorted({s for s, _ in both})
    cases = sorted(c for c in {c for _, c in both} if all((s, c) in both for s in seeds))
    if not cases:
        return None
    diff = np.array([[a[s, c] - b[s, c] for c in cases] for s in seeds])
    per_case = diff.mean(0)
    return {**hierarchical_bootstrap(diff, n_boot, seed), "a_better": int((per_case > 0).sum()),
            "b_better": int((per_case < 0).sum())}
