"""How the cascade combines its two stages: rules compared on the tumour study's trained 600 s models.

Stage 2 segments liver and tumour inside stage 1's liver box. On the real CT in ../shared, stage 2 models
trained on synthetic boxes dropped whole parts of a liver that stage 1 had found, so the rule that pastes
stage 2 back matters. Each rule is scored on the synthetic validation set (liver Dice, label ≥ 1; tumour
Dice per case; median volume ratio) and on the real CT (liver Dice), from the same predictions:

- ``stage 2 alone``: stage 2's labels in the box, background elsewhere (the cascade before this study);
- ``stage-1 liver, stage-2 tumour``: stage 1's liver, with stage 2's tumour inside it (Christ et al. 2016);
- ``union``: stage 2's labels where it calls foreground, stage 1's liver elsewhere;
- ``core D mm``: stage 2's labels, and stage 1's liver more than D mm inside its edge (in-plane,
  ``uh.keep_liver_core``) where stage 2 calls background (``uh.predict_cascade`` with ``Stage2.core_mm = D``).

    cd bench && python cascade_rules.py      # about 25 s per arm and seed; needs the study's trained models

Results: bench/results/cascade_rules.json; table in BENCHMARKS.md §5f.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import nibabel as nib
import numpy as np
import tumour_study as ts
from common import ROOT, md_table, stamp, write_table

import unet_helpers as uh

RESULTS = ROOT / "bench" / "results" / "cascade_rules.json"
CORES = (2.0, 4.0, 6.0, 10.0)
SHAPE = (256, 256, 48)  # the study's synthetic CT
ROI = uh.roi_size_for(SHAPE)  # stage 2's window as the study trained and scores it (also on the real CT): 160
ARMS = ("cascade + 2.5D context 3", "cascade + context 3, contrast-balanced",
        "contrast-balanced + stage 2 on 96² patches")


def stages(models: dict, context: int, windowed: np.ndarray, slices: np.ndarray, spacing) -> tuple:
    """Stage 1's post-processed labels and stage 2's labels in the box without the core rule (background elsewhere)."""
    raw = uh.predict_slices(models["stage1"], slices, windowed.shape[:2], context, "cpu")
    s2 = uh.predict_cascade(raw, windowed, spacing, uh.Stage2(models["stage2"], ROI, core_mm=None), context, "cpu")
    return uh.postprocess(raw), s2


def rules(s1: np.ndarray, s2: np.ndarray, spacing) -> dict[str, np.ndarray]:
    """Every rule's final (post-processed) labels from the two stages' labels."""
    liver1 = s1 >= 1
    out = {"stage 2 alone": s2}
    christ = liver1.astype(np.uint8)
    christ[(s2 == 2) & liver1] = 2
    out["stage-1 liver, stage-2 tumour"] = christ
    out["union"] = np.where(s2 >= 1, s2, liver1).astype(np.uint8)
    for mm in CORES:
        out[f"core {mm:g} mm"] = uh.keep_liver_core(s2, liver1, spacing, mm)
    return {k: uh.postprocess(v) for k, v in out.items()}


def score_seed(arm: str, seed: int, val_files: list) -> dict:
    """Per rule: real-CT liver Dice and the validation set's liver, tumour and volume-ratio scores."""
    cfg = {**ts.BASE, **ts.ARMS[arm]}
    models, ctx = ts.load_models(arm, seed), cfg["context"]
    res: dict[str, dict] = {}
    real = uh.load_case(ts.REAL_CT / "abdomen_ct_3mm_ras.nii.gz")
    truth = np.asanyarray(nib.load(str(ts.REAL_CT / "abdomen_ct_3mm_ras_liver.nii.gz")).dataobj) > 0.5
    w = uh.window_hu(real.image, cfg["hu_window"])
    for name, pred in rules(*stages(models, ctx, w, uh.network_slices(w, cfg["image_size"]), real.spacing),
                            real.spacing).items():
        res[name] = {"real_ct_liver": uh.dice(uh.from_canonical(pred, real.source_affine) >= 1, truth), "rows": []}
    for c in ts.cached(val_files, cfg, None):
        full = uh.window_hu(uh.load_case(c.meta["image_path"]).image, c.meta["hu_window"])
        for name, pred in rules(*stages(models, ctx, full, c.image, c.meta["spacing"]), c.meta["spacing"]).items():
            res[name]["rows"].append(uh.overlap_scores(pred, c.label_full, c.meta["spacing"]))
    for r in res.values():
        rows = r.pop("rows")
        tum = [x for x in rows if x["has_tumor"]]
        r.update(liver=statistics.mean(x["dice_liver_lits"] for x in rows),
                 tumour=statistics.mean(x["dice_tumor"] for x in tum),
                 ratio=statistics.median(x["tumor_volume_ratio"] for x in tum))
    return res


def table(results: dict) -> str:
    """Mean over seeds per arm and rule."""
    body = []
    for arm, seeds in results.items():
        for rule in next(iter(seeds.values())):
            vals = [s[rule] for s in seeds.values()]
            real = [v["real_ct_liver"] for v in vals]
            body.append([arm, rule, f"{statistics.mean(v['liver'] for v in vals):.4f}",
                         f"{statistics.mean(v['tumour'] for v in vals):.3f}",
                         f"{statistics.mean(v['ratio'] for v in vals):.2f}",
                         f"{statistics.mean(real):.3f} ({' / '.join(f'{x:.3f}' for x in real)})"])
    return md_table(["arm (600 s, 96 training cases)", "rule", "liver Dice (label ≥ 1), validation",
                     "tumour Dice per case", "volume pred/true (median)", "liver Dice, real CT (seeds)"], body)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--results", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    if not (ts.REAL_CT / "abdomen_ct_3mm_ras.nii.gz").exists():
        raise SystemExit(f"the real CT is not in {ts.REAL_CT}: this comparison needs it")
    val_files = ts.dataset("validation", 16, SHAPE)
    results = {arm: {str(s): score_seed(arm, s, val_files) for s in a.seeds} for arm in a.arms}
    uh.atomic_write(a.results, lambda tmp: tmp.write_text(json.dumps(uh.json_safe(results), indent=1)))
    write_table("cascade_rules", stamp("cd bench && python cascade_rules.py") + "\n\n" + table(results))
    return results


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
