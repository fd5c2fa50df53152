"""Real CT livers as a standing arm of the study: recipes trained and scored on real LiTS-derived slices.

The slices in ../shared/data/real_liver_slices (61 patients, 291 axial slices of 256², liver masks only; see its
README) are split by patient, 75 % to train and 25 % to score, as a user would run the notebook on them. Every
recipe trains for the same wall-clock here (steps measured per recipe and stage before training, as in
``tumour_study.py``), with ``CONTEXT_SLICES = 1`` (a file's slices are not neighbours in the body) and the quick
U-Net at 128², and is scored by per-case liver Dice (label ≥ 1 against the mask, the final checkpoint). Cascade
recipes are also scored with one part of the cascade changed at inference (the probes), on the same models:

- ``stage 1 alone``: stage 1's own prediction, post-processed, without stage 2;
- ``box from the true liver``: stage 2 on the box of the reference liver instead of stage 1's (the liver-core
  rule still uses stage 1's liver);
- ``box from all of stage 1's liver``: the box around every liver component stage 1 found, not its largest;
- ``no liver-core rule``: stage 2's background calls deep inside stage 1's liver are not overruled;
- ``no post-processing``: the largest-component step left out (stage 1's box still comes from its largest
  component);
- ``both stages' liver`` (with and without the liver-core rule): liver-or-not in the box from the mean of stage 1's
  and stage 2's probabilities (``uh.Stage2.average_liver``); ``stage 2's liver alone``: without that mean.

    python bench/real_liver.py --seconds 90 --seeds 0 1 2

Results: bench/results/real_liver.json (one row per recipe and seed, so an interrupted run resumes); tables in
BENCHMARKS.md (block ``real_liver``). Liver only: these slices carry no tumour labels, and their grey values are
HU clipped to 0–255, so the numbers are real-CT liver numbers, not LiTS results.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import time
from pathlib import Path

import numpy as np
from common import ROOT, WORK, hierarchical_bootstrap, md_table, stamp, write_table
from study import cached, fit, load, mean_sd, save, stage_config, train_arm
from tumour_study import REAL_RECIPE

import unet_helpers as uh

REAL_SLICES = ROOT.parent / "shared" / "data" / "real_liver_slices"
RESULTS = ROOT / "bench" / "results" / "real_liver.json"
VAL_FRACTION = 0.25  # share of patients scored, as in the measurement that found the problem
SPLIT_SEED = 0  # one split for every recipe and seed: the seeds vary training only
IMAGE_SIZE = uh.PRESETS["quick"]["IMAGE_SIZE"]  # the notebook's input size on a CPU

ONE_STAGE = {**uh.RECIPES["default"], "cascade": False}
NO_FLOOR = {"min_stage1_steps": 0}  # the cascade split by its share alone, as before uh.CASCADE_MIN_STAGE1_STEPS
STAGE2_LIVER = {"average_liver": False}  # scored with stage 2's liver alone, as these recipes were measured
RECIPES: dict[str, dict] = {  # name: recipe (uh.RECIPES keys); every one trains with 1 slice in
    "baseline": uh.RECIPES["baseline"],
    "one-stage default": ONE_STAGE,
    "default": uh.RECIPES["default"],  # stage 1 at least uh.CASCADE_MIN_STAGE1_STEPS steps, else one stage
    "cascade, stage 1 a fifth, no floor (the default before)": {**uh.RECIPES["default"], **NO_FLOOR, **STAGE2_LIVER},
    "cascade, stage 1 half the time": {**uh.RECIPES["default"], "stage1_share": 0.5, **NO_FLOOR, **STAGE2_LIVER},
    "cascade, stage 2 on whole boxes": {**uh.RECIPES["default"], "stage2_window_fraction": None, **NO_FLOOR,
                                        **STAGE2_LIVER},
    # stage 1's floor of optimizer steps (uh.cascade_plan's min_stage1_steps) lower and higher than the default's
    # uh.CASCADE_MIN_STAGE1_STEPS: the default's until 2026-12-05 (120), and 320 (at 240 s near half the budget,
    # where a seed whose calibration measured slower steps trains one stage instead)
    "default, stage 1 at least 120 steps (before)": {**uh.RECIPES["default"], "min_stage1_steps": 120},
    "default, stage 1 at least 320 steps": {**uh.RECIPES["default"], "min_stage1_steps": 320},
    # stage 2 starts from stage 1's final weights (tumour_study.py's arm of §5h): it then keeps what stage 1 learnt
    # of the liver on whole slices while it learns the box
    "cascade, stage 2 from stage 1's weights": {**uh.RECIPES["default"], "stage2_init": "stage1", **STAGE2_LIVER,
                                                "min_stage1_steps": 120},  # the floor it was measured with
    # the Kaggle set's scale (tumour_study.py's arms of the same names): one stage at the slices' native 256²; one
    # network on whole slices at 128² for stage 1's share of the budget, then at native 256² for the rest
    "one-stage default, native 256²": {**ONE_STAGE, "image_size": 256},
    "one network, 128² then native 256²": {**ONE_STAGE, "image_size": 256, "coarse_size": 128},
}
PROBES = ("stage 1 alone", "box from the true liver", "box from all of stage 1's liver", "no liver-core rule",
          "no post-processing", "both stages' liver", "both stages' liver, no core rule", "stage 2's liver alone")
AVERAGED = ("both stages' liver", "both stages' liver, no core rule")  # probes with uh.Stage2.average_liver on


def split(data_dir: Path = REAL_SLICES) -> tuple[list, list]:
    """(training, scored) case files: patients split once, 75 / 25."""
    if not data_dir.exists():
        raise FileNotFoundError(f"{data_dir} is absent: the real slices come with the project's shared folder "
                                "(../shared/data/real_liver_slices beside the checkout)")
    cases = uh.find_cases(data_dir)
    train_ids, val_ids = uh.split_cases([c.case_id for c in cases], VAL_FRACTION, seed=SPLIT_SEED)
    by_id = {c.case_id: c for c in cases}
    return [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]


def study_config(recipe: dict, roi: int, depth: int = 4) -> dict:
    """A recipe as ``tumour_study``'s training helpers take it: 128² input (or the recipe's ``image_size``), one
    slice in, stage 2's window in pixels (the recipe's fraction of the liver box)."""
    frac = recipe.get("stage2_window_fraction")
    return {**recipe, "image_size": recipe.get("image_size", IMAGE_SIZE), "context": 1,
            "stage2_window_px": uh.patch_size_for(roi, frac, 2 ** depth) if recipe["cascade"] and frac else None}


def train_recipe(name: str, seed: int, seconds: float, batch: int, train_files: list, work: Path,
                 base: int = 16) -> tuple[dict, dict, int | None, float, dict]:
    """Train a recipe for ``seconds`` here (``study.train_arm``: stage 1, and stage 2 on the liver boxes for a
    cascade, split as the product splits it).

    Returns:
        (config, {stage: final model}, liver-box size or None (one stage), measured training seconds,
        {stage: optimizer steps}).
    """
    recipe = RECIPES[name]
    roi = uh.roi_size_for(uh.canonical_shape(train_files[0].image)) if recipe["cascade"] else None
    cfg = study_config(recipe, roi or 0)
    models, steps, roi, train_s = train_arm(cfg, train_files, seconds, seed, batch, base,
                                            work / f"{name.replace(' ', '_')}_{seed}")
    return cfg, models, roi, train_s, steps


def cascade_with_box(stage1_pred: np.ndarray, box_mask: np.ndarray, full: np.ndarray, spacing, stage2: uh.Stage2,
                     context: int, stage1_fg: np.ndarray) -> np.ndarray:
    """``uh.predict_cascade`` with the liver box taken from ``box_mask`` instead of stage 1's liver; everything
    else (stage 2, the two stages' liver averaged where ``stage2.average_liver``, the liver-core rule on stage 1's
    own liver) as there."""
    box, crop = uh.cascade_input(box_mask.astype(np.uint8), full, spacing, stage2, box_mask)
    out = np.zeros_like(stage1_pred)
    if box is not None:
        x0, x1, y0, y1, z0, z1 = box
        out[x0:x1, y0:y1, z0:z1] = uh.label_box(stage2, crop, box, context, "cpu", stage1_fg=stage1_fg)
    return uh.keep_liver_core(out, uh.postprocess(stage1_pred) >= 1, spacing, stage2.core_mm)


def liver_dice_per_case(cfg: dict, models: dict, roi: int | None, cases: list, probe: str | None = None) -> dict:
    """Per-case liver Dice (label ≥ 1) of a recipe's final models on cached cases, or of one of its :data:`PROBES`.

    Stage 1, stage 2 and post-processing run as in ``uh.evaluate``; a probe changes one part of that.
    """
    out = {}
    average = (cfg.get("average_liver", False) or probe in AVERAGED) and probe != "stage 2's liver alone"
    core = None if probe in ("no liver-core rule", "both stages' liver, no core rule") else uh.CASCADE_CORE_MM
    stage2 = uh.Stage2(models["stage2"], roi, mirror=cfg["stage2_mirror"], core_mm=core,
                       average_liver=average) if roi else None
    for c in cases:
        truth = c.label_full
        pred, fg = uh.predict_slices(models["stage1"], c.image, truth.shape[:2], cfg["context"], "cpu",
                                     foreground=True)
        if stage2 is not None and probe != "stage 1 alone":
            full = uh.window_hu(uh.load_case(c.meta["image_path"]).image, c.meta["hu_window"])
            if probe == "box from the true liver":
                pred = cascade_with_box(pred, truth >= 1, full, c.meta["spacing"], stage2, cfg["context"], fg)
            elif probe == "box from all of stage 1's liver":
                pred = cascade_with_box(pred, pred >= 1, full, c.meta["spacing"], stage2, cfg["context"], fg)
            else:
                pred = uh.predict_cascade(pred, full, c.meta["spacing"], stage2, cfg["context"], "cpu", stage1_fg=fg)
        if cfg["postprocess"] and probe != "no post-processing":
            pred = uh.postprocess(pred)
        out[c.case_id] = uh.dice(pred >= 1, truth >= 1)
    return out


def load_models(name: str, seed: int, work: Path, base: int = 16, steps: dict | None = None) -> dict:
    """The final networks of a finished recipe × seed, from their ``last.pt``; with the row's ``steps``, refused
    where they were trained for other steps (the run folders do not name the budget: a later run overwrites)."""
    models = {}
    for stage in ("stage1", "stage2") if RECIPES[name]["cascade"] else ("stage1",):
        ck = uh.load_checkpoint(work / f"{name.replace(' ', '_')}_{seed}" / stage / "last.pt")
        if steps and ck["train_config"]["steps_per_epoch"] != max(1, steps[stage] // 4):
            raise ValueError(f"{name} seed {seed}: its {stage} on disk was trained for other steps than the row's "
                             f"{steps[stage]}; retrain it")
        models[stage] = uh.UNet(1, 3, base, 4)
        models[stage].load_state_dict(ck["model"])
    return models


def run(name: str, seed: int, seconds: float, batch: int, train_files: list, val_files: list, work: Path,
        base: int = 16) -> dict:
    """Train one recipe with one seed and score it (and its probes, for a cascade) on the scored patients."""
    cfg, models, roi, train_s, steps = train_recipe(name, seed, seconds, batch, train_files, work, base)
    va = cached(val_files, cfg, None)
    row = {"recipe": name, "seed": seed, "seconds_budget": seconds, "train_seconds": train_s, "steps": steps,
           "roi_size": roi,
           "patch_size": cfg["stage2_window_px"], "per_case": liver_dice_per_case(cfg, models, roi, va)}
    if roi:
        row["probes"] = {p: liver_dice_per_case(cfg, models, roi, va, p) for p in PROBES}
    return row


def steps_curve(steps_list: list[int], seed: int, batch: int, train_files: list, val_files: list, work: Path,
                name: str = "one-stage default", base: int = 16) -> list[dict]:
    """Liver Dice of a one-stage recipe trained for a fixed number of steps (not seconds): how many optimizer steps
    a network needs on these real slices before it finds the liver, which stage 1 of a cascade must be given."""
    cfg = study_config(RECIPES[name], 0)
    tr, va = cached(train_files, cfg, None), cached(val_files, cfg, None)
    conf = stage_config(cfg, "stage1")
    rows = []
    for steps in steps_list:
        t0 = time.perf_counter()
        model = fit(tr, conf, seed, batch, base, steps, work / f"steps_{steps}_{seed}")
        rows.append({"recipe": name, "seed": seed, "steps": steps, "train_seconds": time.perf_counter() - t0,
                     "per_case": liver_dice_per_case(cfg, {"stage1": model}, None, va)})
        print(f"{name}, {steps} steps, seed {seed}: liver {_per_case_mean(rows[-1]['per_case']):.3f}", flush=True)
    return rows


def steps_table(rows: list[dict]) -> str:
    """Liver Dice by training steps (mean ± sd over seeds of the per-case mean)."""
    body = []
    for steps in sorted({r["steps"] for r in rows}):
        rs = [r for r in rows if r["steps"] == steps]
        means = [_per_case_mean(r["per_case"]) for r in rs]
        body.append([steps, len(rs), f"{statistics.mean(r['train_seconds'] for r in rs):.0f}",
                     mean_sd(means),
                     f"{min(v for r in rs for v in r['per_case'].values()):.3f}"])
    return md_table(["optimizer steps (batch 16)", "seeds", "train s", "liver Dice per case", "worst case"], body)


def _per_case_mean(per_case: dict) -> float:
    return statistics.mean(per_case.values())


SYNTHETIC = (ROOT / "bench" / "results" / "tumour_study_native.json",  # the synthetic study: the native arms,
             ROOT / "bench" / "results" / "tumour_study_test.json")  # and the default retrained with its variants
# recipe here: the arm of the synthetic study that trained the same recipe (tumour_study.REAL_RECIPE read backwards);
# the default trains that arm's recipe where its stage-1 floor does not bind (checked in synthetic_tumour)
SYNTHETIC_ARM = {recipe: arm for arm, recipe in REAL_RECIPE.items()}
SYNTHETIC_ARM["default"] = "the default, both stages' liver"  # the default as it ships (its liver averaged)
# at 600 s neither floor binds on synthetic CT (stage 1 trains 800+ steps): the same arm, checked in synthetic_tumour
SYNTHETIC_ARM["default, stage 1 at least 120 steps (before)"] = "the default, both stages' liver"
SYNTHETIC_ARM["default, stage 1 at least 320 steps"] = "the default, both stages' liver"


def synthetic_tumour(name: str, paths: tuple[Path, ...] = SYNTHETIC) -> str:
    """The recipe's per-case tumour Dice (over cases with tumour) in the synthetic study, mean ± sd over seeds, or
    "not measured". A cascade recipe counts as its synthetic arm only where its stage-1 floor did not bind there
    (every seed's stage 1 trained at least the recipe's ``min_stage1_steps``, else ``uh.CASCADE_MIN_STAGE1_STEPS``):
    then it trained exactly that arm."""
    rows = [r for path in paths for r in load(path) if r["arm"] == SYNTHETIC_ARM.get(name)
            and r["set"] == "validation"]
    floor = RECIPES[name].get("min_stage1_steps", uh.CASCADE_MIN_STAGE1_STEPS) if RECIPES[name]["cascade"] else 0
    if not rows or any(r["steps"].get("stage2") and r["steps"]["stage1"] < floor for r in rows):
        return "not measured"
    vals = [r["summary"]["dice_tumor"] for r in rows]
    return mean_sd(vals)


def table(rows: list[dict], reference: str = "one-stage default") -> str:
    """Per recipe: per-case liver Dice (mean over cases; mean ± std over seeds), median and worst case, the
    measured training seconds, and the difference to ``reference`` with a case × seed bootstrap interval."""
    body = []
    ref = {r["seed"]: r["per_case"] for r in rows if r["recipe"] == reference}
    for name in RECIPES:
        rs = [r for r in rows if r["recipe"] == name]
        if not rs:
            continue
        means = [_per_case_mean(r["per_case"]) for r in rs]
        pooled = [v for r in rs for v in r["per_case"].values()]
        diff = "-"
        if name != reference and all(r["seed"] in ref for r in rs):
            d = hierarchical_bootstrap([[v - ref[r["seed"]][c] for c, v in r["per_case"].items()] for r in rs])
            diff = f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
        body.append([name, f"{rs[0]['seconds_budget']:.0f}",
                     f"{statistics.mean(r['train_seconds'] for r in rs):.0f}", len(rs),
                     mean_sd(means),
                     f"{statistics.median(pooled):.3f}", f"{min(pooled):.3f}", diff, synthetic_tumour(name)])
    return md_table(["recipe", "budget s", "train s (measured)", "seeds", "liver Dice per case (mean ± sd over seeds)",
                     "median case", "worst case", f"vs {reference} [95 % CI, cases × seeds]",
                     "synthetic tumour Dice per case (96 cases, 600 s, over cases with tumour)"], body)


def probe_table(rows: list[dict]) -> str:
    """For each cascade recipe, its liver Dice with one part of the cascade changed at inference (same models)."""
    body = []
    for name in RECIPES:
        rs = [r for r in rows if r["recipe"] == name and "probes" in r]
        if not rs:
            continue
        cells = []
        for probe in PROBES:
            if not all(probe in r["probes"] for r in rs):  # a probe added after these rows were scored
                cells.append("-")
                continue
            d = hierarchical_bootstrap([[r["probes"][probe][c] - v for c, v in r["per_case"].items()] for r in rs])
            mean = statistics.mean(_per_case_mean(r["probes"][probe]) for r in rs)
            cells.append(f"{mean:.3f} ({d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}])")
        body.append([name, f"{statistics.mean(_per_case_mean(r['per_case']) for r in rs):.3f}", *cells])
    return md_table(["recipe", "as trained", *(f"{p} (change [95 % CI])" for p in PROBES)], body)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=90.0, help="training wall-clock of every recipe")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES))
    ap.add_argument("--batch", type=int, default=uh.PRESETS["quick"]["BATCH_SIZE"])
    ap.add_argument("--base", type=int, default=uh.PRESETS["quick"]["BASE_CHANNELS"], help="U-Net width")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--data", type=Path, default=REAL_SLICES)
    ap.add_argument("--steps-curve", type=int, nargs="*", default=[],
                    help="instead: the one-stage default trained for these numbers of steps")
    ap.add_argument("--probes", action="store_true",
                    help="score the trained cascades of --recipes at --seconds again, with their probes")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--tables-only", action="store_true", help="train nothing: the tables of the stored rows")
    a = ap.parse_args(argv)
    train_files, val_files = split(a.data)
    if a.steps_curve:
        path = a.results.with_name(a.results.stem + "_steps.json")
        curve = load(path)
        for seed in a.seeds:
            todo = [n for n in a.steps_curve if not any((r["seed"], r["steps"]) == (seed, n) for r in curve)]
            curve += steps_curve(todo, seed, a.batch, train_files, val_files, WORK / "real_liver_runs", base=a.base)
            save(curve, path)
        if not a.no_write:
            write_table("real_liver_steps", stamp("python bench/real_liver.py " + shlex.join(argv or [])) + "\n\n"
                        + steps_table(curve))
        return curve
    rows = load(a.results)
    for seed in a.seeds if not a.tables_only else []:
        for name in a.recipes:
            if any((r["recipe"], r["seed"], r["seconds_budget"]) == (name, seed, a.seconds) for r in rows):
                continue
            new = run(name, seed, a.seconds, a.batch, train_files, val_files, WORK / "real_liver_runs", a.base)
            rows = [*load(a.results), new]
            save(rows, a.results)
            print(f"{name} seed {seed}: liver {_per_case_mean(new['per_case']):.3f} "
                  f"({new['train_seconds']:.0f} s training)", flush=True)
    if a.probes:  # the cascades scored again with today's inference, and their probes (training rows unchanged)
        for r in rows:
            if r["seconds_budget"] == a.seconds and r["roi_size"] and r["recipe"] in a.recipes:
                roi = r["roi_size"]
                cfg = study_config(RECIPES[r["recipe"]], roi)
                va = cached(val_files, cfg, None)
                models = load_models(r["recipe"], r["seed"], WORK / "real_liver_runs", a.base, r["steps"])
                r["per_case"] = liver_dice_per_case(cfg, models, roi, va)
                r["probes"] = {p: liver_dice_per_case(cfg, models, roi, va, p) for p in PROBES}
                r["rescored"] = time.strftime("%Y-%m-%d")
                print(f"rescored {r['recipe']} seed {r['seed']}: liver {_per_case_mean(r['per_case']):.3f}", flush=True)
        save(rows, a.results)
    rows = [r for r in rows if r["seconds_budget"] == a.seconds]
    if not a.no_write:
        setup = (f"Real CT: {len(train_files)} training and {len(val_files)} scored patients of "
                 f"../shared/data/real_liver_slices (split by patient, seed {SPLIT_SEED}); liver masks only; "
                 f"{a.seconds:.0f} s of training per recipe on this machine; U-Net base {a.base}, depth 4, "
                 f"{IMAGE_SIZE}² input (256² for the recipes named native 256²), one slice in, batch {a.batch}; "
                 "final checkpoint; per-case liver Dice "
                 "(label ≥ 1).")
        command = "python bench/real_liver.py " + shlex.join(argv or [])
        probes = ("**Probes** (the cascade's trained models, one part changed at inference; in brackets the change "
                  "against the recipe as trained):\n\n" + probe_table(rows))
        write_table(f"real_liver_{a.seconds:.0f}s", "\n\n".join([stamp(command), setup, table(rows), probes]))
    return rows


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
