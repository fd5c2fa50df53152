"""Inference-side changes on the tumour study's trained models, without retraining (BENCHMARKS.md §5j).

Two things a user could add at inference, at no cost in training time:

- **test-time augmentation of stage 2**: its softmax averaged over views of each box slice, mapped back to
  the slice's grid: shifts of ±6 pixels along each axis and scales of about 0.9 and 1.1 (sides rounded to a
  multiple of 16: 144 and 176 for the study's 160-pixel boxes), which training also draws
  (``uh.augment_batch``), and mirror flips, which it does not (no left-right flip in training: the liver lies
  on the patient's right). nnU-Net averages over mirrored views of networks trained with mirroring.
- **a size floor for predicted tumour** (``uh.drop_small_tumour``, the recipe's ``min_tumor_ml``): tumour
  components (26-connected) under the floor relabelled liver, against false lesions (lesion precision).

Scored on the study's validation set with an arm's final models of each seed; every floor is applied to
every view's predictions. The floor's sizes are read off this validation set: a floor chosen here must be
checked on the kept-aside set before it is used.

    cd bench && python inference_probe.py --arms 'stage 2 on 64² patches, stage 1 a fifth'   # ~1 min per model

Results: bench/results/inference_probe.json; table in BENCHMARKS.md §5j.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import tumour_study as ts
from common import ROOT, any_overlap, md_table, stamp, write_table
from recipe_study import load, save
from tumour_bias import KEYS, study_cases, trained_models

import unet_helpers as uh

STUDY = ROOT / "bench" / "results" / "tumour_study_96_600s_v4.json"  # the study run whose models are scored
RESULTS = ROOT / "bench" / "results" / "inference_probe.json"
VIEWS = ("none", "shift", "scale", "flip")
FLOORS = (0.0, 0.1, 0.2, 0.3)  # mL


class ViewAverage(torch.nn.Module):
    """A network whose output is the log of its softmax averaged over views of the input, each mapped back.

    Args:
        model: the network (logits out).
        view: "shift" (the input and the input rolled by ±``shift`` pixels along each axis), "scale" (the input
            and the input resized by 0.875 and 1.125, sides rounded to a multiple of 16, at least 16: a side that
            rounds back to its own size is not rescaled), "flip" (the input and its mirrors along each axis and
            both).
        shift: pixels of the "shift" views.
    """

    def __init__(self, model: torch.nn.Module, view: str, shift: int = 6):
        super().__init__()
        if view not in VIEWS[1:]:
            raise ValueError(f"view must be one of {VIEWS[1:]}, got {view!r}")
        self.model, self.view, self.shift = model, view, shift

    def views(self, size: Sequence[int]) -> list[tuple[Callable, Callable]]:
        """(to the view, back to the input's grid) pairs, the input itself first."""
        same = (lambda t: t, lambda t: t)
        if self.view == "shift":
            d = self.shift
            return [same] + [(lambda t, s=s: torch.roll(t, s, (-2, -1)),
                              lambda t, s=s: torch.roll(t, (-s[0], -s[1]), (-2, -1)))
                             for s in ((d, 0), (-d, 0), (0, d), (0, -d))]
        if self.view == "scale":
            def resize(to):
                return lambda t: F.interpolate(t, size=list(to), mode="bilinear", align_corners=False)
            return [same] + [(resize([max(16, round(s * f / 16) * 16) for s in size]), resize(size))
                             for f in (0.875, 1.125)]
        raise ValueError(f"no views of {self.view!r} here: 'flip' is the library's uh.MirrorAverage")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.view == "flip":  # the product's test-time mirroring (uh.Stage2.mirror), not a copy of it
            return uh.MirrorAverage(self.model)(x)
        probs = [back(torch.softmax(self.model(to(x)).float(), 1)) for to, back in self.views(x.shape[-2:])]
        return torch.log(torch.stack(probs).mean(0).clamp_min(1e-8))


DISTANCES = ("hd95_liver_lits_mm", "assd_liver_lits_mm", "hd95_tumor_mm", "assd_tumor_mm")  # not computed here


def summary(preds: dict[str, np.ndarray], cases: list) -> dict:
    """The library's summary (``uh.summarize``) of some predictions, its ``tumour_bias.KEYS``: per-case and global
    tumour Dice, median volume ratio, lesion recall and precision, false tumour on the tumour-free cases. Surface
    distances are left out (NaN): they cost most of the scoring time and are not reported here."""
    rows, lesions = [], []
    for c in cases:
        pred, truth, spacing = preds[c.case_id], c.label_full, c.meta["spacing"]
        rows.append({**uh.overlap_scores(pred, truth, spacing), **dict.fromkeys(DISTANCES, float("nan"))})
        lesions.append(uh.lesion_detection(pred, truth, spacing))
    s = uh.summarize(rows, lesions)
    return {k: any_overlap(s, k) for k in KEYS}  # lesion rates with any overlap, as the stored rows


def run(arm: str, seeds: Sequence[int], study: Path = STUDY, views: Sequence[str] = VIEWS,
        floors: Sequence[float] = FLOORS, set_name: str = "validation") -> tuple[list[dict], dict]:
    """Score the arm's final models of each seed with each view of stage 2 and each size floor.

    Args:
        set_name: "validation", or "kept-aside" (once, for a choice made on the validation set).

    Returns:
        (one row per seed, view and floor, the study's setup).
    """
    setup, cases = study_cases(study, arm, seeds[0], set_name)
    rows = []
    for seed in seeds:
        roi, models = trained_models(study, arm, seed)
        for view in views:
            stage2 = models["stage2"] if view == "none" else ViewAverage(models["stage2"], view)
            preds = ts.evaluate_arm(arm, {**models, "stage2": stage2}, roi, cases, keep_predictions=True,
                                    mirror=False)["predictions"]  # the views are the probe's: none means none
            for floor in floors:
                kept = {c.case_id: uh.drop_small_tumour(preds[c.case_id], c.meta["spacing"], floor) for c in cases}
                rows.append({"study": study.name, "set": set_name, "arm": arm, "seed": seed, "view": view,
                             "min_tumor_ml": floor, **summary(kept, cases)})
                print(json.dumps(rows[-1]), flush=True)
    return rows, setup


GROUP = ("study", "set", "arm", "view", "min_tumor_ml")  # a table row: the mean over seeds


def key(row: dict) -> tuple:
    """What one probe row measured: a row measured again replaces it."""
    return (*(row[k] for k in GROUP), row["seed"])


def _mean(values: list) -> str:
    """The mean of the values that are numbers (a result file holds NaN as null), to 3 decimals; '-' if none."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return f"{statistics.mean(finite):.3f}" if finite else "-"


def table(rows: list[dict]) -> str:
    """Mean over seeds per study, set, arm, view and floor, in the order first met."""
    body = []
    for group in dict.fromkeys(tuple(r[k] for k in GROUP) for r in rows):
        at = [r for r in rows if tuple(r[k] for k in GROUP) == group]
        study, set_name, arm, view, floor = group
        body.append([study.removeprefix("tumour_study_").removesuffix(".json"), set_name, arm, view, f"{floor:g}",
                     len(at)] + [_mean([r[k] for r in at]) for k in KEYS])
    return md_table(["study run", "set", "arm", "stage-2 views", "tumour floor mL", "seeds", "tumour Dice per case",
                     "tumour Dice global", "volume pred/true (median)", "lesion recall", "lesion precision",
                     "FP tumour mL (tumour-free)"], body)


def main(argv: list[str]) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arms", nargs="+", default=["stage 2 on 64² patches, stage 1 a fifth"],
                    help="cascade arms of the tumour study")
    ap.add_argument("--study", type=Path, default=STUDY, help="the study results file that trained their models")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--views", nargs="+", default=list(VIEWS), choices=VIEWS)
    ap.add_argument("--floors", type=float, nargs="+", default=list(FLOORS))
    ap.add_argument("--set", dest="set_name", default="validation", choices=("validation", "kept-aside"))
    ap.add_argument("--runs", default="tumour_runs", help="the study's --runs: where its trained networks are")
    ap.add_argument("--results", type=Path, default=RESULTS, help="rows of other probes already there are kept")
    ap.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    a = ap.parse_args(argv)
    ts.RUNS = a.runs
    got = []
    for arm in a.arms:
        got += run(arm, a.seeds, a.study, a.views, a.floors, a.set_name)[0]
    rows = [r for r in load(a.results) if key(r) not in {key(g) for g in got}] + got
    save(rows, a.results)
    if not a.no_write:
        command = " ".join(["cd bench && python inference_probe.py", shlex.join(argv)]).strip()
        write_table("inference_probe", stamp(command) + "\n\nSynthetic CT only. The tumour study's final models "
                    "(study run: its results file, e.g. `96_600s_v4` is `results/tumour_study_96_600s_v4.json`), "
                    "mean over seeds.\n\n" + table(rows))
    return rows

if __name__ == "__main__":
    main(sys.argv[1:])
