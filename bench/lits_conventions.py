"""The study's tumour Dice in each convention, recomputed from the per-case rows its results files keep.

LiTS's "Dice per case" averages over every volume: a volume without tumour scores 1 when none is predicted and 0
when any is (the LiTS evaluation code, Bilic et al. 2019). The study chose its recipes on the mean over the cases
*with* tumour, and nnU-Net leaves out the tumour-free cases without predicted tumour. This script scores every
validation and kept-aside row of the 600-s studies in all three, each with an interval that resamples training
seeds and cases (``common.hierarchical_bootstrap``), and the paired differences behind the default's choice.

    python bench/lits_conventions.py

Tables in BENCHMARKS.md (block ``lits_conventions``); no training, a few seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import ROOT, hierarchical_bootstrap, md_table, seeds_by_cases, stamp, write_table
from study import load, paired

RESULTS = ROOT / "bench" / "results"
STUDIES = {  # name in the tables: results file
    "§5d–§5f (96 cases, 600 s)": RESULTS / "tumour_study_96_600s.json",
    "§5g (96 cases, 600 s)": RESULTS / "tumour_study_96_600s_v2.json",
    "§5i–§5k (96 cases, 600 s)": RESULTS / "tumour_study_96_600s_v4.json",
    "§5l (96 cases, 600 s, native 256²)": RESULTS / "tumour_study_native.json",
}
CONVENTIONS = {  # per-case key: what it averages
    "dice_tumor": "cases with tumour",
    "dice_tumor_lits": "LiTS: every case",
    "dice_tumor_all_cases": "nnU-Net: empty/empty left out",
}
PAIRS = [("default + liver-box cascade", "baseline"), ("cascade + 2.5D context 3", "default + liver-box cascade"),
         ("cascade + context 3, contrast-balanced", "cascade + 2.5D context 3"),
         ("contrast-balanced + stage 2 on 96² patches", "cascade + context 3, contrast-balanced"),
         ("stage 2 on 64² patches, stage 1 a fifth", "contrast-balanced + stage 2 on 96² patches"),
         ("stage 2 on 64² patches, stage 1 a fifth", "baseline"),
         ("lesion contrast, mirrored stage 2", "default, retrained"),
         ("lesion contrast, mirrored stage 2", "64² patches, a fifth, mirrored stage 2"),
         ("64² patches, a fifth, mirrored stage 2", "default, retrained"),
         ("default, retrained", "stage 2 on 64² patches, stage 1 a fifth"),
         ("lesion contrast, mirrored stage 2", "baseline"),
         ("one stage at native 256²", "lesion contrast, mirrored stage 2"),
         ("one network, 128² then native 256²", "lesion contrast, mirrored stage 2")]


def interval(rows: list[dict], key: str) -> str:
    """'0.668 [0.496, 0.818]': the mean over seeds and cases with its seeds × cases bootstrap interval."""
    table, _ = seeds_by_cases(rows, key)
    if not table or not table[0]:
        return "-"
    d = hierarchical_bootstrap(table)
    return f"{d['mean']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"


def arm_table(rows: list[dict]) -> str:
    """Per set and arm: tumour Dice per case in each convention, seeds and cases."""
    body = []
    for set_name in ("validation", "kept-aside"):
        for arm in dict.fromkeys(r["arm"] for r in rows if r["set"] == set_name):
            rs = [r for r in rows if r["arm"] == arm and r["set"] == set_name]
            cases = len(seeds_by_cases(rs, "dice_tumor_lits")[1])
            body.append([set_name, arm, len(rs), cases, *(interval(rs, k) for k in CONVENTIONS)])
    return md_table(["set", "arm", "seeds", "cases", *(f"tumour Dice per case, {v}" for v in CONVENTIONS.values())],
                    body)


def pair_table(rows: list[dict]) -> str:
    """Paired differences A − B on the validation set over the cases with tumour and in LiTS's convention (seeds ×
    cases bootstrap; nnU-Net's convention has no pairs: a case one arm leaves out, the other may score)."""
    val = [r for r in rows if r["set"] == "validation"]
    keys = ("dice_tumor", "dice_tumor_lits")
    body = []
    for a, b in PAIRS:
        cells = [paired(val, a, b, key) for key in keys]
        if all(cells):
            body.append([a, b, *(f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" for d in cells)])
    return md_table(["arm A", "arm B", *(f"A − B, {CONVENTIONS[k]}" for k in keys)], body)


def main(argv: list[str] | None = None) -> dict[str, str]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    tables = {}
    for name, path in STUDIES.items():
        rows = [r for r in load(Path(path)) if r["set"] in ("validation", "kept-aside") and "per_case" in r]
        if rows:
            tables[name] = f"**{name}**\n\n" + arm_table(rows) + "\n\nPaired, validation set:\n\n" + pair_table(rows)
    text = stamp("python bench/lits_conventions.py") + "\n\n" + "\n\n".join(tables.values())
    if not a.no_write:
        write_table("lits_conventions", text)
    return tables


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
