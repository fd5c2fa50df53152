"""The budget-fair tumour study: recipes compared at the same training wall-clock, at 256², with a kept-aside set.

Every arm trains for the same number of seconds on this machine (the step count that fills them is
measured per arm and stage before training: the cascade trains two networks, a larger input costs
more per step; the measured seconds stand beside every row), on 256×256 synthetic CT (the Kaggle
set's in-plane size), and is scored in 3D on a validation set generated from another seed (the
generator seeds 100 / 200 are those of the earlier step-based study, now at 256²). A third set, with
smaller and fainter lesions (seed 300), is kept aside: it is scored once, for the arm chosen on the
validation set and the baseline, and never used to choose. The models trained on synthetic CT are also
run on the real abdominal CT in ../shared (liver Dice only: it has no tumour labels).

    python bench/tumour_study.py --seconds 200 --seeds 0 1 2            # the study (about 1 hour for 5 arms)
    python bench/tumour_study.py --kept-aside "CHOSEN ARM" baseline     # then the final check, and the tables

Results: bench/results/tumour_study.json (one entry per arm, seed and set, so an interrupted study
resumes); tables in BENCHMARKS.md §5.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from common import (
    ROOT,
    WORK,
    any_overlap,
    case_score,
    md_table,
    paired_ratio_bootstrap,
    seeds_by_cases,
    stamp,
    write_table,
)
from study import (
    CALIBRATION_STEPS,
    cached,
    load,
    mean_sd,
    new_model,
    paired,
    save,
    stage_config,
    train_arm,
    train_config,
)

import unet_helpers as uh

RESULTS = ROOT / "bench" / "results" / "tumour_study.json"
REAL_CT = ROOT.parent / "shared" / "data" / "real_ct"
BASE = {"context": 1, "tumor_share": 0.0, "liver_share": 0.0, "empty_fraction": 1.0, "loss": "dice_ce",
        "postprocess": False, "cascade": False, "image_size": 128, "hu_window": (-100.0, 400.0)}  # the seed's setup
# "default" is the recipe default as it stood before this study (frozen here, so that the arms keep their meaning
# when the study changes uh.RECIPES["default"]): tumour/liver oversampling, fewer empty slices, post-processing
OLD_DEFAULT = {"tumor_share": 0.33, "liver_share": 0.17, "empty_fraction": 0.2, "postprocess": True}
WINDOW = {"hu_window": (-50.0, 250.0)}
# the default of §5g (the recipe default now, but for its tumour floor of §5j, a post-processing step: arms set it
# with "min_tumor_ml"): the 2.5D cascade, contrast-balanced tumour draws, stage 2 on 64² windows with four fifths
# of the budget; the arms from §5h on change one thing of it
DEFAULT_5G = {**OLD_DEFAULT, "cascade": True, "context": 3, "lesion_balance": True, "stage2_window_px": 64,
              "stage1_share": 0.2}
# the recipe default (uh.RECIPES["default"]) but for its 0.1 mL tumour floor: §5k's lesion contrast, mirrored stage 2
DEFAULT_NOW = {**DEFAULT_5G, "lesion_augment": True, "stage2_mirror": True}
ARMS: dict[str, dict] = {
    "baseline": {},
    "default": OLD_DEFAULT,
    "default + liver-box cascade": {**OLD_DEFAULT, "cascade": True},
    "default + HU window -50..250": {**OLD_DEFAULT, **WINDOW},
    "default + cascade + HU window -50..250": {**OLD_DEFAULT, "cascade": True, **WINDOW},
    "cascade + lesion contrast": {**OLD_DEFAULT, "cascade": True, "lesion_augment": True},
    "cascade + 2.5D context 3": {**OLD_DEFAULT, "cascade": True, "context": 3},
    "cascade + lesion contrast + context 3": {**OLD_DEFAULT, "cascade": True, "lesion_augment": True, "context": 3},
    "cascade + context 3, stage 1 a fifth": {**OLD_DEFAULT, "cascade": True, "context": 3, "stage1_share": 0.2},
    "cascade + context 5": {**OLD_DEFAULT, "cascade": True, "context": 5},
    "cascade + context 3, tumour share 0.5": {**OLD_DEFAULT, "cascade": True, "context": 3, "tumor_share": 0.5},
    "cascade + context 3, contrast-balanced": {**OLD_DEFAULT, "cascade": True, "context": 3, "lesion_balance": True},
    "contrast-balanced + stage 2 on 96² patches": {**OLD_DEFAULT, "cascade": True, "context": 3, "lesion_balance": True,
                                                    "stage2_window_px": 96},
    "contrast-balanced + stage 2 on 64² patches": {**OLD_DEFAULT, "cascade": True, "context": 3, "lesion_balance": True,
                                                    "stage2_window_px": 64},
    "stage 2 on 64² patches, stage 1 a fifth": DEFAULT_5G,
    # stage 2's U-Net one level shallower (depth 3): on 64² windows its deepest level works on 4² maps with most of
    # the weights, so dropping it makes a step cheaper (bench_train.py depths(), BENCHMARKS.md §2)
    "stage 2 of depth 3 on 64² patches, stage 1 a fifth": {**DEFAULT_5G, "stage2_depth": 3},
    "stage 2 on 64² patches, stage 1 a tenth": {**DEFAULT_5G, "stage1_share": 0.1},
    # stage 2 starts from stage 1's final weights instead of random ones (same network; stage 1 saw the same
    # anatomy at half the resolution), so that stage 1's fifth of the budget also serves stage 2
    "64² patches, a fifth, stage 2 from stage 1's weights": {**DEFAULT_5G, "stage2_init": "stage1"},
    # the default once more, as a control trained beside the arms above (same calibration, same days): §5g found
    # two runs of one recipe differing by more than their seeds' spread
    "default, retrained": DEFAULT_5G,
    # the default with lesion-contrast augmentation (uh.lesion_contrast: per slice, the lesions' contrast to the
    # liver scaled by 0.5-1.5 and inverted half the time): §5g's misses are faint lesions, one 22 mL lesion drawn
    # 12 HU brighter than its liver missed by every model, and the training set holds 18 faint bright lesions
    "64² patches, a fifth, lesion contrast": {**DEFAULT_5G, "lesion_augment": True},
    # the same with every tumour slice's contrast changed (lesion_p 1.0, not the recipe's 0.5: twice the bright
    # lesions made from dark ones), and with the Tversky loss (misses weigh 0.7, false calls 0.3) against the
    # under-called hyperdense lesions
    "lesion contrast on every tumour slice": {**DEFAULT_5G, "lesion_augment": True, "lesion_settings": {"p": 1.0}},
    "lesion contrast, Tversky loss": {**DEFAULT_5G, "lesion_augment": True, "loss": "tversky_ce"},
    # the default with nnU-Net-like intensity augmentation (STRONG_AUGMENT: contrast x0.75-1.25, gamma 0.67-1.49):
    # §5j found its models fitting their training cases far better than new ones and not helped by more steps
    "64² patches, a fifth, strong intensity augmentation": {**DEFAULT_5G, "strong_augment": True},
    # §5k: stage 2's windows mirrored left-right and up-down (nnU-Net mirrors on every axis); the liver-on-the-right
    # prior that forbids it on whole slices does not hold inside the liver box, and the default overfits (§5j).
    # Scored with stage 2 averaged over the box and its mirrors (stage2_of; rescored so on 2026-11-30)
    "64² patches, a fifth, mirrored stage 2": {**DEFAULT_5G, "stage2_mirror": True},
    "lesion contrast, mirrored stage 2": DEFAULT_NOW,
    # the Kaggle set's scale (BENCHMARKS.md §5l): the default without its cascade, one network on whole slices at
    # the CT's native 256² (what the full preset trained before §5l); and one network trained on whole slices at
    # 128² for stage 1's share of the budget, then at native 256² for the rest (coarse to fine, no liver box)
    "one stage at native 256²": {**DEFAULT_NOW, "cascade": False, "stage2_mirror": False, "image_size": 256},
    "one network, 128² then native 256²": {**DEFAULT_NOW, "cascade": False, "stage2_mirror": False,
                                           "image_size": 256, "coarse_size": 128},
    # the recipe default exactly as uh.RECIPES["default"] trains and post-processes it (its 0.1 mL tumour floor
    # too), retrained with the baseline for the fresh test set (--test)
    "the default": {**DEFAULT_NOW, "min_tumor_ml": 0.1},
    # the same trained networks (``models_of``: not trained again) with the liver-or-not call in the liver box
    # averaged over both stages' probabilities (uh.Stage2.average_liver), with and without the liver-core rule
    "the default, both stages' liver": {**DEFAULT_NOW, "min_tumor_ml": 0.1, "average_liver": True,
                                        "models_of": "the default"},
    "the default, both stages' liver, no core rule": {**DEFAULT_NOW, "min_tumor_ml": 0.1, "average_liver": True,
                                                      "core_mm": None, "models_of": "the default"},
    # stage 2 starts from stage 1's final weights, so that what stage 1 learnt of the liver on whole slices is not
    # thrown away (real_liver.py's recipe of the same idea); scored as trained and with both stages' liver
    "the default, stage 2 from stage 1": {**DEFAULT_NOW, "min_tumor_ml": 0.1, "stage2_init": "stage1"},
    "the default, stage 2 from stage 1, both stages' liver": {**DEFAULT_NOW, "min_tumor_ml": 0.1,
                                                              "stage2_init": "stage1", "average_liver": True,
                                                              "models_of": "the default, stage 2 from stage 1"},
    # the default as it ships (both stages' liver) with stage 1's floor of optimizer steps (uh.cascade_plan) at 120
    # and at 240 or 320: at budgets where the floor binds, stage 1 takes more of the time and stage 2 less
    "the default, stage 1 at least 120 steps": {**DEFAULT_NOW, "min_tumor_ml": 0.1, "average_liver": True,
                                                "min_stage1_steps": 120},
    "the default, stage 1 at least 240 steps": {**DEFAULT_NOW, "min_tumor_ml": 0.1, "average_liver": True,
                                                "min_stage1_steps": 240},
    "the default, stage 1 at least 320 steps": {**DEFAULT_NOW, "min_tumor_ml": 0.1, "average_liver": True,
                                                "min_stage1_steps": 320},
}
SETS = {  # name: (generator seed, lesion size scale, lesion contrast scale)
    "train": (100, 1.0, 1.0), "validation": (200, 1.0, 1.0), "kept-aside": (300, 0.6, 0.6),
    # the study's test sets (--test): generator seeds no earlier set used, lesions as in validation and as in the
    # kept-aside set; scored once, for the final default and the baseline, after every choice was made
    "test": (400, 1.0, 1.0), "test, hard lesions": (410, 0.6, 0.6)}


def dataset(name: str, n: int, shape) -> list:
    """Case files of one synthetic set (generated once)."""
    seed, size, contrast = SETS[name]
    folder = WORK / f"tumour_{name}_{n}_{'x'.join(map(str, shape))}"
    uh.make_synthetic_dataset(folder, n, tuple(shape), seed=seed, progress=False, lesion_size_scale=size,
                              lesion_contrast_scale=contrast)
    return uh.find_cases(folder)


RUNS = "tumour_runs"  # the folder under WORK that holds the trained networks; main's --runs sets it


def run_folder(arm: str, seed: int) -> Path:
    """Where an arm × seed keeps its networks (``stage1/``, ``stage2/``, ``calibration/``), under ``WORK/RUNS``; an
    arm that differs from another only at inference (``models_of``) uses that arm's."""
    arm = ARMS.get(arm, {}).get("models_of", arm)
    return WORK / RUNS / f"{arm.replace(' ', '_')}_{seed}"


def run_arm(arm: str, seed: int, seconds: float, batch: int, train_files: list, val_files: list,
            base: int = 16) -> dict:
    """Train one arm with one seed for ``seconds`` of training (``study.train_arm``), score it on the validation
    set."""
    cfg = {**BASE, **ARMS[arm]}
    if cfg.get("stage2_init") and cfg.get("stage2_depth"):
        raise ValueError(f"arm {arm!r}: stage 2 can start from stage 1's weights only with stage 1's depth")
    models, steps, roi, train_s = train_arm(cfg, train_files, seconds, seed, batch, base, run_folder(arm, seed))
    row = score(arm, seed, "validation", models, roi, cached(val_files, cfg, None))
    row.update(seconds_budget=seconds, train_seconds=train_s, steps=steps, batch=batch, roi_size=roi,
               real_ct_liver_dice=real_ct_liver_dice(arm, models, roi), calibration_steps=CALIBRATION_STEPS,
               lesion_settings=cfg.get("lesion_settings", {}))
    return row


def load_models(arm: str, seed: int, base: int = 16) -> dict:
    """The final networks of a finished arm × seed, from their ``last.pt`` (stage 2 too for a cascade arm)."""
    cfg = {**BASE, **ARMS[arm]}
    out = run_folder(arm, seed)
    models = {}
    for name in ("stage1", "stage2") if cfg["cascade"] else ("stage1",):
        if not (out / name / "last.pt").exists():
            raise FileNotFoundError(f"{out / name / 'last.pt'} is missing: rerun the arm '{arm}' seed {seed}")
        models[name] = new_model(stage_config(cfg, name), seed, base)
        models[name].load_state_dict(uh.load_checkpoint(out / name / "last.pt")["model"])
    return models


def stage2_of(arm: str, models: dict, roi: int | None) -> uh.Stage2 | None:
    """The arm's stage 2 at inference (None without a cascade): averaged over mirrored boxes where the arm trains
    on mirrored windows (``stage2_mirror``, as the recipe does)."""
    if "stage2" not in models:
        return None
    cfg = ARMS[arm]
    return uh.Stage2(models["stage2"], roi, mirror=cfg.get("stage2_mirror", False),
                     average_liver=cfg.get("average_liver", False), core_mm=cfg.get("core_mm", uh.CASCADE_CORE_MM))


def evaluate_arm(arm: str, models: dict, roi: int | None, cases: list, keep_predictions: bool = False) -> dict:
    """``uh.evaluate`` of an arm's final models on cached cases: its context, stage 2 (:func:`stage2_of`) and
    post-processing."""
    cfg = {**BASE, **ARMS[arm]}
    stage2 = stage2_of(arm, models, roi)
    return uh.evaluate(models["stage1"], cases, cfg["context"], "cpu", postprocess_pred=cfg["postprocess"],
                       keep_predictions=keep_predictions, progress=False, stage2=stage2,
                       min_tumor_ml=cfg.get("min_tumor_ml", 0.0))


def score(arm: str, seed: int, set_name: str, models: dict, roi: int | None, cases: list) -> dict:
    """3D scores of an arm's final models on some cached cases (post-processed as the recipe says)."""
    ev = evaluate_arm(arm, models, roi, cases)
    keys = ("dice_liver_lits", "dice_liver", "dice_tumor", "dice_tumor_lits", "dice_tumor_all_cases",
            "dice_tumor_global", "dice_liver_global", "median_tumor_volume_ratio", "lesion_recall", "lesion_precision",
            "lesion_f1", "lesion_dice", "lesion_recall_any_overlap", "lesion_precision_any_overlap",
            "tumor_burden_rmse", "fp_tumor_ml_tumor_free_cases")
    per_case = [{k: r[k] for k in ("case", "has_tumor", "dice_liver", "dice_liver_lits", "dice_tumor",
                                   "dice_tumor_lits", "tumor_ml", "pred_tumor_ml", "tumor_volume_ratio",
                                   "fp_tumor_ml")}
                for r in ev["per_case"]]
    return {"arm": arm, "seed": seed, "set": set_name, "summary": {k: ev["summary"][k] for k in keys},
            "lesion_recall_by_volume": ev["summary"]["lesion_recall_by_volume"], "per_case": per_case}


def by_contrast(arm: str, seed: int, set_name: str, models: dict, roi: int | None, files: list) -> dict:
    """Lesions of at least 1 mL found (any overlap, as in the lesion recall) and their voxels predicted tumour,
    by contrast group: each lesion's mean HU minus the liver's median HU (``uh.lesion_contrasts``), grouped
    by ``uh.contrast_group`` (±15 HU)."""
    cases = cached(files, {**BASE, **ARMS[arm]}, None)
    ev = evaluate_arm(arm, models, roi, cases, keep_predictions=True)
    out = {g: {"lesions": 0, "found": 0, "voxels": 0, "hit_voxels": 0} for g in uh.CONTRAST_GROUPS}
    for f, c in zip(files, cases):
        ct = uh.load_case(f.image, f.label, f.case_id)
        comps, deltas = uh.lesion_contrasts(np.asarray(ct.image, np.float32), np.asarray(ct.label))
        hit = ev["predictions"][c.case_id] == 2
        sizes = np.bincount(comps.ravel(), minlength=len(deltas) + 1)[1:]
        hits = np.bincount(comps[hit], minlength=len(deltas) + 1)[1:]
        big = sizes * np.prod(ct.spacing) / 1000 >= 1.0
        for g, n, h in zip(uh.contrast_group(deltas)[big], sizes[big], hits[big]):
            o = out[uh.CONTRAST_GROUPS[g]]
            o["lesions"], o["found"] = o["lesions"] + 1, o["found"] + int(h > 0)
            o["voxels"], o["hit_voxels"] = o["voxels"] + int(n), o["hit_voxels"] + int(h)
    return {"arm": arm, "seed": seed, "set": f"by contrast: {set_name}", "by_contrast": out}


def real_ct_liver_dice(arm: str, models: dict, roi: int | None) -> float | None:
    """Liver Dice (label ≥ 1 vs the mask) of an arm's synthetic-trained models on the real CT in ../shared."""
    image, mask = REAL_CT / "abdomen_ct_3mm_ras.nii.gz", REAL_CT / "abdomen_ct_3mm_ras_liver.nii.gz"
    if not image.exists():
        return None
    cfg = {**BASE, **ARMS[arm]}
    stage2 = stage2_of(arm, models, roi)
    pred = uh.predict_volume(models["stage1"], image, cfg["image_size"], cfg["context"], cfg["hu_window"],
                             postprocess_pred=cfg["postprocess"], stage2=stage2)
    truth = np.asanyarray(nib.load(str(mask)).dataobj) > 0.5  # both in the file's own voxel order
    return uh.dice(pred >= 1, truth)


def _mean(rows: list[dict], key: str) -> float:
    vals = [r["summary"][key] for r in rows if r["summary"].get(key) is not None]
    return statistics.mean(vals) if vals else float("nan")


REAL_LIVER = ROOT / "bench" / "results" / "real_liver.json"  # bench/real_liver.py: recipes on real CT slices
BEFORE = "default, stage 1 at least 120 steps (before)"  # real_liver.py's default with the floor of that time
REAL_RECIPE = {  # arm here: the same recipe in bench/real_liver.py (one slice in, as those slices require)
    "baseline": "baseline",
    "lesion contrast, mirrored stage 2": "cascade, stage 1 a fifth, no floor (the default before)",
    "one stage at native 256²": "one-stage default, native 256²",
    "one network, 128² then native 256²": "one network, 128² then native 256²",
    "the default": "default",
    "the default, stage 2 from stage 1": "cascade, stage 2 from stage 1's weights",
    "the default, stage 1 at least 120 steps": BEFORE,
    "the default, stage 1 at least 240 steps": "default",
    "the default, stage 1 at least 320 steps": "default, stage 1 at least 320 steps"}
REAL_PROBE = {  # arm here scored another way than its recipe in bench/real_liver.py: (that recipe, its probe)
    "the default": (BEFORE, "stage 2's liver alone"),
    "the default, both stages' liver": (BEFORE, "both stages' liver"),
    "the default, both stages' liver, no core rule": (BEFORE,
                                                      "both stages' liver, no core rule"),
    "the default, stage 2 from stage 1, both stages' liver": ("cascade, stage 2 from stage 1's weights",
                                                              "both stages' liver")}


def real_slice_liver(arm: str, seconds: float = 60.0) -> str:
    """The arm's recipe trained and scored on the real liver slices (``bench/real_liver.py``, ``seconds`` of
    training; an arm that changes inference only: the probe of that change): per-case liver Dice, mean ± sd over
    seeds; "-" where it was not run there."""
    recipe, probe = REAL_PROBE.get(arm, (REAL_RECIPE.get(arm), None))
    rows = [r for r in load(REAL_LIVER) if r["recipe"] == recipe and r["seconds_budget"] == seconds]
    if not rows and recipe == BEFORE:  # not run apart at 60 s: both floors train one stage there, so the
        rows = [r for r in load(REAL_LIVER) if r["recipe"] == "default" and r["seconds_budget"] == seconds
                and not r["roi_size"]]  # default's one-stage rows stand for it
    # a probe where the row has it; a row that trained one stage (no probes) is scored as it is
    scores = [r["probes"][probe] if probe and r["roi_size"] else r["per_case"] for r in rows
              if not (probe and r["roi_size"]) or probe in r.get("probes", {})]
    means = [statistics.mean(v.values()) for v in scores]
    if len(means) == 1:
        return f"{means[0]:.3f} (1 seed)"
    return mean_sd(means)


def vs_baseline(rs: list[dict], base: list[dict]) -> str:
    """An arm's per-case tumour Dice over the baseline's on the same set, '1.54× [1.38, 1.71]': both pooled over
    all their seeds, the interval a bootstrap over cases and each arm's seeds (``common.paired_ratio_bootstrap``)."""
    a, cases_a = seeds_by_cases(rs, "dice_tumor")
    b, cases_b = seeds_by_cases(base, "dice_tumor")
    if not base or rs[0]["arm"] == base[0]["arm"] or cases_a != cases_b or not cases_a:
        return "-"
    r = paired_ratio_bootstrap(a, b)
    return f"{r['ratio']:.2f}× [{r['low']:.2f}, {r['high']:.2f}]"


def train_seconds(val: list[dict]) -> str:
    """The measured training seconds of an arm (mean over seeds), with the range and the largest miss where a seed
    missed its budget by more than 5 %."""
    secs, budget = [r["train_seconds"] for r in val], val[0]["seconds_budget"]
    worst = max((s / budget - 1 for s in secs), key=abs)
    return f"{statistics.mean(secs):.0f}" + (f" ({min(secs):.0f}–{max(secs):.0f}: a seed {worst:+.1%} off budget)"
                                             if abs(worst) > 0.05 else "")


def table(rows: list[dict], set_name: str) -> str:
    """Mean ± std over seeds of each arm's scores on one set, with seconds beside every row."""
    by_arm: dict[str, list[dict]] = {}
    for r in rows:
        if r["set"] == set_name:
            by_arm.setdefault(r["arm"], []).append(r)
    body = []
    for arm in ARMS:
        rs = by_arm.get(arm)
        if not rs:
            continue
        val = [r for r in rows if r["arm"] == arm and r["set"] == "validation"]
        steps = " + ".join(f"{min(r['steps'][k] for r in val)}–{max(r['steps'][k] for r in val)}"
                           for k in val[0]["steps"]) if val else "-"
        lits = [statistics.mean(case_score(c, "dice_tumor_lits") for c in r["per_case"]) for r in rs]
        body.append([arm, f"{val[0]['seconds_budget']:.0f}" if val else "-", train_seconds(val) if val else "-",
                     steps, len(rs), mean_sd([r["summary"]["dice_liver_lits"] for r in rs]), mean_sd(lits),
                     *(mean_sd([r["summary"][k] for r in rs]) for k in (
                         "dice_tumor", "dice_tumor_all_cases", "dice_tumor_global", "median_tumor_volume_ratio")),
                     *(mean_sd([any_overlap(r["summary"], k) for r in rs])
                       for k in ("lesion_recall", "lesion_precision")),
                     mean_sd([r["summary"]["fp_tumor_ml_tumor_free_cases"] for r in rs]),
                     vs_baseline(rs, by_arm.get("baseline", [])),
                     f"{real_slice_liver(arm)} / {real_slice_liver(arm, 240.0)}"])
    return md_table(["arm", "budget s", "train s (measured)", "steps", "seeds", "liver Dice (label ≥ 1)",
                     "tumour Dice per case, LiTS (every case)", "tumour Dice per case (cases with tumour)",
                     "tumour Dice, nnU-Net (empty/empty left out)", "tumour Dice global",
                     "tumour volume pred/true (median)", "lesion recall (any overlap)",
                     "lesion precision (any overlap)", "FP tumour mL (tumour-free)",
                     "tumour per case vs baseline [95 % CI]",
                     "REAL CT slices: liver Dice per case (real_liver.py), 60 s / 240 s of training"], body)


def paired_rows(rows: list[dict]) -> str:
    """Paired differences on the validation set (same seeds, same cases; bootstrap over seeds and cases)."""
    val = [r for r in rows if r["set"] == "validation"]
    body = []
    for a, b in (("default", "baseline"), ("default + liver-box cascade", "default"),
                 ("default + HU window -50..250", "default"), ("default + cascade + HU window -50..250", "default"),
                 ("default + cascade + HU window -50..250", "default + liver-box cascade"),
                 ("default + liver-box cascade", "baseline"),
                 ("default + cascade + HU window -50..250", "baseline"),
                 ("cascade + lesion contrast", "default + liver-box cascade"),
                 ("cascade + 2.5D context 3", "default + liver-box cascade"),
                 ("cascade + lesion contrast + context 3", "default + liver-box cascade"),
                 ("cascade + lesion contrast", "baseline"), ("cascade + 2.5D context 3", "baseline"),
                 ("cascade + lesion contrast + context 3", "baseline"),
                 ("cascade + context 3, stage 1 a fifth", "cascade + 2.5D context 3"),
                 ("cascade + context 5", "cascade + 2.5D context 3"),
                 ("cascade + context 3, tumour share 0.5", "cascade + 2.5D context 3"),
                 ("cascade + context 3, contrast-balanced", "cascade + 2.5D context 3"),
                 ("cascade + context 3, contrast-balanced", "baseline"),
                 ("contrast-balanced + stage 2 on 96² patches", "cascade + context 3, contrast-balanced"),
                 ("contrast-balanced + stage 2 on 96² patches", "cascade + 2.5D context 3"),
                 ("contrast-balanced + stage 2 on 96² patches", "baseline"),
                 ("contrast-balanced + stage 2 on 64² patches", "contrast-balanced + stage 2 on 96² patches"),
                 ("contrast-balanced + stage 2 on 64² patches", "baseline"),
                 ("stage 2 on 64² patches, stage 1 a fifth", "contrast-balanced + stage 2 on 96² patches"),
                 ("stage 2 on 64² patches, stage 1 a fifth", "contrast-balanced + stage 2 on 64² patches"),
                 ("stage 2 on 64² patches, stage 1 a fifth", "baseline"),
                 ("stage 2 of depth 3 on 64² patches, stage 1 a fifth", "stage 2 on 64² patches, stage 1 a fifth"),
                 ("stage 2 on 64² patches, stage 1 a tenth", "stage 2 on 64² patches, stage 1 a fifth"),
                 ("stage 2 of depth 3 on 64² patches, stage 1 a fifth", "baseline"),
                 ("stage 2 on 64² patches, stage 1 a tenth", "baseline"),
                 ("64² patches, a fifth, stage 2 from stage 1's weights", "stage 2 on 64² patches, stage 1 a fifth"),
                 ("64² patches, a fifth, stage 2 from stage 1's weights", "baseline"),
                 ("default, retrained", "stage 2 on 64² patches, stage 1 a fifth"),
                 ("64² patches, a fifth, lesion contrast", "default, retrained"),
                 ("64² patches, a fifth, lesion contrast", "stage 2 on 64² patches, stage 1 a fifth"),
                 ("lesion contrast on every tumour slice", "default, retrained"),
                 ("lesion contrast, Tversky loss", "default, retrained"),
                 ("lesion contrast, Tversky loss", "64² patches, a fifth, lesion contrast"),
                 ("64² patches, a fifth, lesion contrast", "baseline"), ("default, retrained", "baseline"),
                 ("64² patches, a fifth, mirrored stage 2", "stage 2 on 64² patches, stage 1 a fifth"),
                 ("lesion contrast, mirrored stage 2", "stage 2 on 64² patches, stage 1 a fifth"),
                 ("lesion contrast, mirrored stage 2", "default, retrained"),
                 ("lesion contrast, mirrored stage 2", "64² patches, a fifth, lesion contrast"),
                 ("lesion contrast, mirrored stage 2", "64² patches, a fifth, mirrored stage 2"),
                 ("64² patches, a fifth, mirrored stage 2", "baseline"),
                 ("lesion contrast, mirrored stage 2", "baseline"),
                 ("one stage at native 256²", "lesion contrast, mirrored stage 2"),
                 ("one network, 128² then native 256²", "lesion contrast, mirrored stage 2"),
                 ("one network, 128² then native 256²", "one stage at native 256²"),
                 ("one stage at native 256²", "baseline"), ("one network, 128² then native 256²", "baseline"),
                 ("the default", "baseline"), ("the default, both stages' liver", "the default"),
                 ("the default, both stages' liver, no core rule", "the default"),
                 ("the default, both stages' liver", "baseline"),
                 ("the default, stage 2 from stage 1", "the default"),
                 ("the default, stage 2 from stage 1, both stages' liver", "the default"),
                 ("the default, stage 2 from stage 1, both stages' liver", "the default, both stages' liver"),
                 ("the default, stage 1 at least 240 steps", "the default, stage 1 at least 120 steps"),
                 ("the default, stage 1 at least 320 steps", "the default, stage 1 at least 120 steps")):
        t, liv = paired(val, a, b), paired(val, a, b, "dice_liver_lits")
        if t is None or liv is None:
            continue
        body.append([a, b, f"{t['mean']:+.3f} [{t['low']:+.3f}, {t['high']:+.3f}]",
                     f"{t['a_better']} / {t['b_better']}",
                     f"{liv['mean']:+.3f} [{liv['low']:+.3f}, {liv['high']:+.3f}]", f"{t['cases']} × {t['seeds']}"])
    return md_table(["arm A", "arm B", "tumour Dice A − B [95 % CI]", "cases A better / B better",
                     "liver Dice (label ≥ 1) A − B", "tumour cases × seeds"], body)


def real_ct_table(rows: list[dict]) -> str:
    """Liver Dice on the real CT sample of each arm's synthetic-trained models (mean ± std over seeds)."""
    body = []
    for arm in ARMS:
        vals = [r.get("real_ct_liver_dice") for r in rows if r["arm"] == arm and r["set"] == "validation"]
        if vals and all(v is not None for v in vals):
            body.append([arm, mean_sd(vals), len(vals)])
    if not body:
        return "Skipped: the real CT samples (../shared/data/real_ct) were not present when the study ran."
    return md_table(["arm (trained on synthetic CT only)", "liver Dice on the real abdominal CT", "seeds"], body)


def ratio_table(rows: list[dict], good: float = 0.8) -> str:
    """Predicted/true tumour volume on the validation cases an arm segments well (tumour Dice ≥ ``good``) and
    on the rest: whether a median ratio below 1 means shrunken lesions or missed ones."""
    body = []
    for arm in ARMS:
        cases = [c for r in rows if r["arm"] == arm and r["set"] == "validation" for c in r["per_case"]
                 if c["has_tumor"]]
        hit = [c["tumor_volume_ratio"] for c in cases if c["dice_tumor"] >= good]
        rest = [c["tumor_volume_ratio"] for c in cases if c["dice_tumor"] < good]
        if cases:
            body.append([arm, f"{len(hit)} of {len(cases)}",
                         f"{statistics.median(hit):.2f} ({min(hit):.2f}–{max(hit):.2f})" if hit else "-",
                         f"{statistics.median(rest):.2f}" if rest else "-"])
    return md_table(["arm", f"case × seed pairs with tumour Dice ≥ {good}", "their volume pred/true: median (range)",
                     "volume pred/true on the others (median)"], body)


def contrast_table(rows: list[dict]) -> str:
    """Lesions found and voxel recall by contrast group, pooled over seeds, per arm and set (lesions grouped on
    the full-resolution HU, not on the network slices that ``uh.lesion_contrast_groups`` reads for sampling)."""
    body = []
    for set_name in ("validation", "training cases"):
        for arm in ARMS:
            rs = [r for r in rows if r["arm"] == arm and r["set"] == f"by contrast: {set_name}"]
            if not rs:
                continue
            cells = []
            for g in uh.CONTRAST_GROUPS:
                n, k, v, h = (sum(r["by_contrast"][g][key] for r in rs)
                              for key in ("lesions", "found", "voxels", "hit_voxels"))
                cells.append(f"{k} of {n}, {h / v:.2f}" if v else "-")
            body.append([set_name, arm, len(rs), *cells])
    return md_table(["set", "arm", "seeds", *(f"{g}: found, voxel recall" for g in uh.CONTRAST_GROUPS)], body)


def arms_tried(results: Path = ROOT / "bench" / "results") -> int:
    """How many arms the tumour studies compared on their validation sets (every tumour_study*.json)."""
    return len({r["arm"] for path in results.glob("tumour_study*.json") for r in load(path)
                if r["set"] == "validation"})


def test_tables(rows: list[dict]) -> str:
    """The test sets' tables (empty where no arm was scored on them)."""
    if not any(r["set"] in TEST_SETS for r in rows):
        return ""
    names = ", ".join(f"{n}: seed {SETS[n][0]}, lesions {SETS[n][1]}× the size and {SETS[n][2]}× the contrast"
                      for n in TEST_SETS)
    return (f"\n\n**Test sets** ({names}; generated after every choice and scored once, for the final default and "
            f"the baseline; {arms_tried()} arm names compared on the validation set by then, variants of the default "
            "scored from its networks included):"
            + "".join(f"\n\n_{n}_:\n\n" + table(rows, n) for n in TEST_SETS))


def write_tables(rows: list[dict], a: argparse.Namespace, command: str) -> None:
    """The study's tables in BENCHMARKS.md §5."""
    setup = (f"Synthetic CT only (no real tumours). Train: {a.train_cases} cases (generator seed 100); validation: "
             f"{a.val_cases} cases (seed 200); kept aside: {a.kept_cases} cases (seed 300, lesions 0.6× the size "
             f"and 0.6× the contrast), all {'×'.join(map(str, a.shape))} voxels. Quick U-Net (base {a.base}, "
             f"depth 4; stage 2 depth 3 where the arm says so), {BASE['image_size']}² input (stage 1's; an arm named "
             f"'native 256²' works at 256²), batch {a.batch}, AdamW "
             "2e-3, warm-up + cosine; every arm "
             "trains for the same wall-clock on this machine (steps measured per arm and stage before training, "
             "the measured training seconds beside each row; 3 epochs of 30 steps timed since 2026-11-30, of "
             "10 before; the cascade gives stage 1 a third and stage 2 two "
             "thirds unless the arm says otherwise, stage 2 on a 160-pixel window around the liver box, resized "
             "only where a liver box is larger); "
             "final checkpoint, 3D per-case Dice, mean ± std over training seeds.")
    write_table(a.tables, stamp(command) + "\n\n" + setup + "\n\n**Validation set** (the study chooses "
                "on this):\n\n" + table(rows, "validation")
                + ("\n\n**Kept-aside set** (smaller, fainter lesions; scored once, after the choice):\n\n"
                   + table(rows, "kept-aside") if any(r["set"] == "kept-aside" for r in rows) else "")
                + test_tables(rows)
                + ("\n\n**Eight of the training cases** (the same final models on lesions they were trained on):\n\n"
                   + table(rows, "training cases") if any(r["set"] == "training cases" for r in rows) else ""))
    write_table(f"{a.tables}_paired", paired_rows(rows))
    write_table(f"{a.tables}_real_ct", real_ct_table(rows))
    write_table(f"{a.tables}_ratio", ratio_table(rows))
    if any(r["set"].startswith("by contrast") for r in rows):
        write_table(f"{a.tables}_contrast", contrast_table(rows))


def check_trained(arm: str, row: dict, batch: int) -> None:
    """Raise unless the arm's models on disk are the ones a validation ``row`` trained (the run folders under one
    ``--runs`` are shared by every results file trained there: a later run of the arm overwrites them)."""
    out = run_folder(arm, row["seed"])
    for name, steps in row["steps"].items():
        trained = uh.load_checkpoint(out / name / "last.pt")["train_config"]["steps_per_epoch"]
        meant = train_config({**BASE, **ARMS[arm]}, row["seed"], batch, steps).steps_per_epoch
        if trained != meant:
            raise ValueError(f"{out / name} was trained for {trained} steps an epoch, not the {meant} "
                             f"of this result: its models were overwritten by another run; retrain the arm")


def rescore(rows: list[dict], a: argparse.Namespace, val_files: list) -> list:
    """Score trained arms again on the validation set and the real CT with today's inference (after a change to
    how the cascade combines its stages); the arm's other scorings are dropped, to be redone by ``score_trained``.
    The training fields (seconds, steps) stay; the models must be the ones those steps trained."""
    for arm in a.rescore:
        for r in [r for r in rows if r["arm"] == arm and r["set"] == "validation"]:
            check_trained(arm, r, a.batch)
            models = load_models(arm, r["seed"], a.base)
            new = {**r, **score(arm, r["seed"], "validation", models, r["roi_size"],
                                cached(val_files, {**BASE, **ARMS[arm]}, None)),
                   "real_ct_liver_dice": real_ct_liver_dice(arm, models, r["roi_size"]),
                   "rescored": time.strftime("%Y-%m-%d")}
            rows = [*(k for k in load(a.results) if (k["arm"], k["seed"]) != (arm, r["seed"])), new]
            save(rows, a.results)
            s = new["summary"]
            print(f"rescored {arm} seed {r['seed']}: liver {s['dice_liver_lits']:.3f} tumour {s['dice_tumor']:.3f} "
                  f"real CT {new['real_ct_liver_dice']}", flush=True)
    return rows


def rescore_as(arm: str, seed: int, rows: list[dict], a: argparse.Namespace, val_files: list) -> dict:
    """The validation row of an arm that only changes inference (``models_of``): the trained arm's networks scored
    the arm's way; the training fields are the trained arm's."""
    source = ARMS[arm]["models_of"]
    trained = [r for r in rows if (r["arm"], r["seed"], r["set"]) == (source, seed, "validation")]
    if not trained:
        raise ValueError(f"arm {arm!r} scores the networks of {source!r}, seed {seed}: train that arm first")
    check_trained(source, trained[0], a.batch)
    models = load_models(arm, seed, a.base)
    roi = trained[0]["roi_size"]
    row = score(arm, seed, "validation", models, roi, cached(val_files, {**BASE, **ARMS[arm]}, None))
    keep = ("seconds_budget", "train_seconds", "steps", "batch", "roi_size", "calibration_steps", "lesion_settings")
    return {**row, **{k: trained[0][k] for k in keep}, "models_of": source,
            "real_ct_liver_dice": real_ct_liver_dice(arm, models, roi)}


TEST_SETS = ("test", "test, hard lesions")


def score_trained(rows: list[dict], a: argparse.Namespace, setup: dict, train_files: list, val_files: list) -> list:
    """The extra scorings of trained arms (kept-aside set, training cases, lesions by contrast), each done once."""
    kept_files = dataset("kept-aside", a.kept_cases, a.shape) if a.kept_aside else []
    test = [(name, a.test, dataset(name, a.kept_cases, a.shape) if a.test else []) for name in TEST_SETS]
    for set_name, arms, files in (("kept-aside", a.kept_aside, kept_files), *test,
                                  ("training cases", a.training_cases, train_files[:8])):
        for arm in arms:
            for r in [r for r in rows if r["arm"] == arm and r["set"] == "validation"]:
                if any((k["arm"], k["seed"], k["set"]) == (arm, r["seed"], set_name) for k in rows):
                    continue
                cfg = {**BASE, **ARMS[arm]}
                row = score(arm, r["seed"], set_name, load_models(arm, r["seed"], a.base), r["roi_size"],
                            cached(files, cfg, None))
                rows = [*load(a.results), {**row, "setup": setup}]
                save(rows, a.results)
                print(f"{set_name} {arm} seed {r['seed']}: tumour {row['summary']['dice_tumor']:.3f}", flush=True)
    for arm in a.by_contrast:
        for r in [r for r in rows if r["arm"] == arm and r["set"] == "validation"]:
            for set_name, files in (("validation", val_files), ("training cases", train_files[:8])):
                if any((k["arm"], k["seed"], k["set"]) == (arm, r["seed"], f"by contrast: {set_name}") for k in rows):
                    continue
                row = by_contrast(arm, r["seed"], set_name, load_models(arm, r["seed"], a.base), r["roi_size"], files)
                rows = [*load(a.results), {**row, "setup": setup}]
                save(rows, a.results)
                print(f"by contrast, {set_name}: {arm} seed {r['seed']}: {row['by_contrast']}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=200.0, help="training wall-clock of every arm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="*", default=list(ARMS))
    ap.add_argument("--kept-aside", nargs="*", default=[], help="arms to score once on the kept-aside set")
    ap.add_argument("--test", nargs="*", default=[],
                    help="arms to score once on the two test sets (the final default and the baseline, last)")
    ap.add_argument("--training-cases", nargs="*", default=[],
                    help="arms to score on 8 of their own training cases (how well they fit what they saw)")
    ap.add_argument("--by-contrast", nargs="*", default=[],
                    help="arms whose lesions are counted by contrast group (validation and 8 training cases)")
    ap.add_argument("--rescore", nargs="*", default=[],
                    help="trained arms scored again on the validation set and the real CT (their other scorings "
                         "are dropped, to be redone with --kept-aside / --training-cases / --by-contrast)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--train-cases", type=int, default=24)
    ap.add_argument("--val-cases", type=int, default=16)
    ap.add_argument("--kept-cases", type=int, default=16)
    ap.add_argument("--shape", type=int, nargs=3, default=[256, 256, 48])
    ap.add_argument("--base", type=int, default=16)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--runs", default="tumour_runs",
                    help="folder (under bench/_work) for the trained networks: another budget's runs keep theirs")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--tables", default="tumour_study", help="BENCHMARKS.md block names the tables replace")
    a = ap.parse_args(argv)
    global RUNS
    RUNS = a.runs
    setup = {"seconds": a.seconds, "batch": a.batch, "train_cases": a.train_cases, "val_cases": a.val_cases,
             "kept_cases": a.kept_cases, "shape": list(a.shape), "base": a.base}
    rows = load(a.results)
    other = [r for r in rows if r.get("setup", setup) != setup]
    if other:  # resuming must not mix runs of other settings into one table
        raise ValueError(f"{a.results} holds runs with other settings ({other[0]['setup']}, now {setup}); "
                         "use another --results file")
    train_files, val_files = dataset("train", a.train_cases, a.shape), dataset("validation", a.val_cases, a.shape)
    rows = rescore(rows, a, val_files)
    for seed in a.seeds if not (a.kept_aside or a.test or a.training_cases or a.by_contrast or a.rescore) else []:
        for arm in a.arms:
            if any((r["arm"], r["seed"], r["set"]) == (arm, seed, "validation") for r in rows):
                continue
            t0 = time.perf_counter()
            if ARMS[arm].get("models_of"):
                new = {**rescore_as(arm, seed, rows, a, val_files), "setup": setup}
            else:
                new = {**run_arm(arm, seed, a.seconds, a.batch, train_files, val_files, a.base), "setup": setup}
            rows = [*load(a.results), new]
            save(rows, a.results)
            s = new["summary"]
            print(f"{arm} seed {seed}: liver {s['dice_liver_lits']:.3f} tumour {s['dice_tumor']:.3f} "
                  f"ratio {s['median_tumor_volume_ratio']:.2f} ({new['train_seconds']:.0f} s training, "
                  f"{time.perf_counter() - t0:.0f} s in all)", flush=True)
    rows = score_trained(rows, a, setup, train_files, val_files)
    if not a.no_write:
        write_tables(rows, a, "cd bench && python tumour_study.py " + shlex.join(argv or []))
    return rows


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
