"""The recipe study: tumour (and liver) Dice of the baseline, single changes, the default, and more budget.

Every arm trains from scratch with the same number of optimizer steps (×2 / ×4 arms excepted) on a
synthetic training set and is scored in 3D on a validation set generated from another seed; each
arm runs with several training seeds. Results go to bench/results/recipe_study.json (one entry per
arm and seed, so an interrupted study resumes) and to the recipe table of BENCHMARKS.md.

    python bench/recipe_study.py --seeds 0 1 2            # the quick arms (about 1 hour on 2 CPU cores)
    python bench/recipe_study.py --full --seeds 0 1 2     # every arm (about 3.5 hours), as in BENCHMARKS.md

A paired comparison (same seeds, same validation cases, bootstrap over cases) tells ties from differences.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
from common import ROOT, WORK, case_score, hierarchical_bootstrap, md_table, stamp, write_table

import unet_helpers as uh

RESULTS = ROOT / "bench" / "results" / "recipe_study.json"
BASE = {**uh.RECIPES["baseline"], "image_size": 128, "cascade": False, "budget": 1}
MILDER = {**uh.RECIPES["default"], "tumor_share": 0.15, "liver_share": 0.1}  # the default, milder oversampling
ARMS: dict[str, dict | None] = {
    "baseline": {},
    "baseline + post-processing": None,  # the baseline's models, scored with post-processing
    "baseline + tumour oversampling": {"tumor_share": 0.33, "liver_share": 0.17, "empty_fraction": 0.2},
    "baseline + 2.5D context 3": {"context": 3},
    "baseline + 2.5D context 5": {"context": 5},
    "baseline + Tversky loss": {"loss": "tversky_ce"},
    "baseline + focal loss": {"loss": "focal_dice"},
    "baseline + per-slice Dice": {"loss": "dice_ce_per_slice"},
    "baseline + image size 160": {"image_size": 160},
    "baseline + liver-box cascade": {"cascade": True},
    "default": {**uh.RECIPES["default"]},
    "default + 2.5D context 3": {**uh.RECIPES["default"], "context": 3},  # the first default recipe
    "default + 2.5D context 3 + liver-box cascade": {**uh.RECIPES["default"], "context": 3, "cascade": True},
    # with the baseline's sampling no loss or input change finds tumour at all, so the same changes are
    # also tried on top of the default, where they can be told apart
    "default + 2.5D context 5": {**uh.RECIPES["default"], "context": 5},
    "default + per-slice Dice": {**uh.RECIPES["default"], "loss": "dice_ce_per_slice"},
    "default + Tversky loss": {**uh.RECIPES["default"], "loss": "tversky_ce"},
    "default + focal loss": {**uh.RECIPES["default"], "loss": "focal_dice"},
    "default + image size 160": {**uh.RECIPES["default"], "image_size": 160},
    # a milder oversampling: does a smaller tumour share hold up better with more steps?
    "default, milder oversampling": MILDER,
    "baseline ×2 steps": {"budget": 2},
    "default ×2 steps": {**uh.RECIPES["default"], "budget": 2},
    "default + 2.5D context 3, ×2 steps": {**uh.RECIPES["default"], "context": 3, "budget": 2},
    "baseline ×4 steps": {"budget": 4},
    "default ×4 steps": {**uh.RECIPES["default"], "budget": 4},
    "default, milder oversampling, ×4 steps": {**MILDER, "budget": 4},
}
QUICK = ["baseline", "baseline + tumour oversampling", "baseline + 2.5D context 3", "baseline + 2.5D context 5",
         "baseline + Tversky loss", "baseline + liver-box cascade", "default", "default + 2.5D context 3",
         "default + 2.5D context 3 + liver-box cascade", "baseline ×2 steps", "default ×2 steps",
         "default + 2.5D context 3, ×2 steps"]


def datasets(n_train: int, n_val: int, shape) -> tuple[list, list]:
    """Training and validation case files, generated from different seeds."""
    tr = WORK / f"study_train_{n_train}"
    va = WORK / f"study_val_{n_val}"
    uh.make_synthetic_dataset(tr, n_train, tuple(shape), seed=100, progress=False)
    uh.make_synthetic_dataset(va, n_val, tuple(shape), seed=200, progress=False)
    return uh.find_cases(tr), uh.find_cases(va)


def run_arm(arm: str, cfg: dict, seed: int, steps: int, batch: int, train_files, val_files, base: int = 16,
            depth: int = 4, lr: float = 2e-3) -> list[dict]:
    """Train one arm with one seed and score it; returns one result row (two for the baseline)."""
    size = cfg["image_size"]
    roi = size if cfg["cascade"] else None
    tr = uh.preprocess_dataset(train_files, WORK / "study_cache_train", size, progress=False, roi_size=roi)
    va = uh.preprocess_dataset(val_files, WORK / "study_cache_val", size, progress=False)
    total = steps * cfg["budget"]
    stage_steps = total // 2 if cfg["cascade"] else total
    out = WORK / "study_runs" / f"{arm.replace(' ', '_')}_{seed}"

    def fit(cases, subdir):
        uh.set_determinism(seed)
        model = uh.UNet(cfg["context"], 3, base, depth)
        data = uh.SliceSet(cases, cfg["context"])
        index = uh.select_slices(cases, cfg["empty_fraction"], seed)
        tc = uh.TrainConfig(epochs=4, batch_size=batch, lr=lr, steps_per_epoch=stage_steps // 4, seed=seed,
                            sampling=uh.Sampling(cfg["tumor_share"], cfg["liver_share"]), loss=cfg["loss"])
        uh.train(model, data, index, tc, out / subdir, resume=False, progress=False)
        return model

    t0 = time.perf_counter()
    model = fit(tr, "stage1")
    stage2 = uh.Stage2(fit(uh.roi_cases(tr), "stage2"), roi) if cfg["cascade"] else None
    train_s = time.perf_counter() - t0
    ev = uh.evaluate(model, va, cfg["context"], "cpu", postprocess_pred=True, keep_predictions=False,
                     progress=False, stage2=stage2)
    rows = []
    variants = [(arm, cfg["postprocess"])]
    if arm == "baseline":
        variants = [("baseline", False), ("baseline + post-processing", True)]
    for name, post in variants:
        per_case = [{"case": r["case"], "has_tumor": r["has_tumor"],
                     "dice_liver": r["dice_liver" if post else "dice_liver_raw"],
                     "dice_tumor": r["dice_tumor" if post else "dice_tumor_raw"],
                     "fp_tumor_ml": r["fp_tumor_ml" if post else "fp_tumor_ml_raw"]} for r in ev["per_case"]]
        s = ev["summary"]
        sfx = "" if post else "_raw"
        rows.append({"arm": name, "seed": seed, "steps": total, "batch": batch, "train_seconds": train_s,
                     "summary": {"dice_liver": s["dice_liver" + sfx], "dice_tumor": s["dice_tumor" + sfx],
                                 "dice_liver_global": s["dice_liver_global" + sfx],
                                 "dice_tumor_global": s["dice_tumor_global" + sfx],
                                 "fp_tumor_ml_tumor_free_cases": float(np.mean(
                                     [r["fp_tumor_ml"] for r in per_case if not r["has_tumor"]] or [math.nan]))},
                     "per_case": per_case})
    return rows


def load(path: Path = RESULTS) -> list[dict]:
    """Stored results."""
    return json.loads(path.read_text()) if path.exists() else []


def save(rows: list[dict], path: Path = RESULTS) -> None:
    """Store results atomically (NaN as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    uh.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(uh.json_safe(rows), indent=1)))


def _ms(vals: list[float | None]) -> str:
    """'mean ± std' of the non-missing values."""
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"


def _ratio(value: float, base: float) -> str:
    """'value / base' as 'N.NN×', or a note when the baseline is 0."""
    if math.isnan(value) or math.isnan(base):
        return "-"
    if base == 0:
        return "baseline is 0" if value > 0 else "0 = 0"
    return f"{value / base:.2f}×"


def per_case_table(rows: list[dict], arms: list[str]) -> str:
    """Per validation case: 3D liver and tumour Dice, mean over seeds, for the given arms."""
    header, cases = ["case", "tumour"], None
    cols = []
    for arm in arms:
        rs = [r for r in rows if r["arm"] == arm]
        if not rs:
            continue
        header += [f"{arm}: liver", f"{arm}: tumour"]
        cases = cases or [(c["case"], c["has_tumor"]) for c in rs[0]["per_case"]]
        by_case = {}
        for r in rs:
            for c in r["per_case"]:
                by_case.setdefault(c["case"], []).append(c)
        cols.append(by_case)
    body = []
    for case, has_tumor in cases or []:
        line = [case, "yes" if has_tumor else "none"]
        for by_case in cols:
            cs = by_case[case]
            line += [f"{statistics.mean(c['dice_liver'] for c in cs):.3f}",
                     f"{statistics.mean(c['dice_tumor'] for c in cs):.3f}" if has_tumor else
                     f"FP {statistics.mean(c['fp_tumor_ml'] for c in cs):.2f} mL"]
        body.append(line)
    return md_table(header, body)


PAIRS = [("default", "baseline + tumour oversampling"), ("default", "default + image size 160"),
         ("default", "default + Tversky loss"), ("default", "default + 2.5D context 3"),
         ("default ×4 steps", "baseline ×4 steps"), ("default ×4 steps", "default, milder oversampling, ×4 steps")]


def paired(rows: list[dict], arm_a: str, arm_b: str, key: str = "dice_tumor", n_boot: int = 10000,
           seed: int = 0) -> dict | None:
    """Paired difference A − B of a per-case score: same seeds, same validation cases.

    The 95 % interval resamples the seeds and the cases (``common.hierarchical_bootstrap``), so that it holds
    the noise of training as well as that of the cases: two runs of one recipe differ within it. Tumour Dice
    uses only the cases with tumour (``dice_tumor_lits`` every case). None when either arm is missing.
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


def paired_table(rows: list[dict], pairs=PAIRS) -> str:
    """Paired differences of per-case tumour and liver Dice for chosen pairs of arms."""
    body = []
    for a, b in pairs:
        t, liv = paired(rows, a, b), paired(rows, a, b, "dice_liver")
        if t is None or liv is None:
            continue
        body.append([a, b, f"{t['mean']:+.3f} [{t['low']:+.3f}, {t['high']:+.3f}]",
                     f"{t['a_better']} / {t['b_better']}",
                     f"{liv['mean']:+.3f} [{liv['low']:+.3f}, {liv['high']:+.3f}]",
                     f"{t['cases']} × {t['seeds']}"])
    return md_table(["arm A", "arm B", "tumour Dice A − B, mean [95 % CI]", "cases A better / B better",
                     "liver Dice A − B", "tumour cases × seeds"], body)


def table(rows: list[dict], command: str, setup: str) -> str:
    """The recipe table: mean ± std over seeds of per-case and global Dice, per arm."""
    by_arm: dict[str, list[dict]] = {}
    for r in rows:
        by_arm.setdefault(r["arm"], []).append(r)
    base_t = {}  # the baseline's mean tumour Dice at each budget (400, 800, 1600 steps)
    for name in ("baseline", "baseline ×2 steps", "baseline ×4 steps"):
        vals = [r["summary"]["dice_tumor"] for r in by_arm.get(name, []) if r["summary"]["dice_tumor"] is not None]
        if vals:
            base_t[by_arm[name][0]["steps"]] = statistics.mean(vals)
    out = []
    for arm in ARMS:
        if arm not in by_arm:
            continue
        rs = by_arm[arm]
        t = [r["summary"]["dice_tumor"] for r in rs if r["summary"]["dice_tumor"] is not None]
        out.append([arm, rs[0]["steps"], len(rs), _ms([r["summary"]["dice_liver"] for r in rs]), _ms(t),
                    _ms([r["summary"]["dice_tumor_global"] for r in rs]),
                    _ms([r["summary"]["dice_liver_global"] for r in rs]),
                    _ms([r["summary"]["fp_tumor_ml_tumor_free_cases"] for r in rs]),
                    _ratio(statistics.mean(t) if t else math.nan, base_t.get(rs[0]["steps"], math.nan)),
                    f"{statistics.mean(r['train_seconds'] for r in rs):.0f}"])
    return (stamp(command) + "\n\n" + setup + "\n\n" + md_table(
        ["arm", "steps", "seeds", "liver Dice (per case)", "tumour Dice (per case)", "tumour Dice (global)",
         "liver Dice (global)", "FP tumour mL (tumour-free cases)", "tumour vs baseline at equal steps",
         "train s"], out))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--full", action="store_true", help="every arm (focal, size 160, ×4 budgets too)")
    ap.add_argument("--arms", nargs="*", help="only these arms")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--train-cases", type=int, default=24)
    ap.add_argument("--val-cases", type=int, default=12)
    ap.add_argument("--shape", type=int, nargs=3, default=[192, 192, 48])
    ap.add_argument("--base", type=int, default=16)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    arms = a.arms or (list(ARMS) if a.full else QUICK)
    train_files, val_files = datasets(a.train_cases, a.val_cases, a.shape)
    rows = load(a.results)
    done = {(r["arm"], r["seed"], r["steps"]) for r in rows}
    for seed in a.seeds:
        for arm in arms:
            cfg = ARMS[arm]
            if cfg is None:
                continue
            cfg = {**BASE, **cfg}
            if (arm, seed, a.steps * cfg["budget"]) in done:
                continue
            t0 = time.perf_counter()
            new = run_arm(arm, cfg, seed, a.steps, a.batch, train_files, val_files, a.base)
            rows = [r for r in load(a.results)
                    if not any((r["arm"], r["seed"]) == (n["arm"], n["seed"]) for n in new)] + new
            save(rows, a.results)
            print(f"{arm} seed {seed}: liver {new[0]['summary']['dice_liver']:.3f} tumour "
                  f"{new[0]['summary']['dice_tumor']:.3f} global {new[0]['summary']['dice_tumor_global']:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if not a.no_write:
        setup = (f"Synthetic CT only. Train: {a.train_cases} cases (generator seed 100); validation: {a.val_cases} "
                 f"cases (seed 200), {'×'.join(map(str, a.shape))} voxels. U-Net base {a.base}, depth 4, 128² input "
                 f"(160² for that arm), batch {a.batch}, AdamW 2e-3 with warm-up + cosine, {a.steps} optimizer steps "
                 "per arm (×2 / ×4 arms: twice / four times as many; the cascade splits them between its two "
                 "stages). 3D per-case Dice (tumour over cases with tumour) and global Dice; mean ± std over "
                 "training seeds. Every arm × seed is stored in `bench/results/recipe_study.json`; the command "
                 "resumes from it (the arms were run in several sittings) and rebuilds these tables.")
        write_table("recipes", table(rows, "python bench/recipe_study.py " + " ".join(argv or []), setup))
        write_table("recipes_per_case", "Per validation case, mean over seeds (synthetic CT; tumour-free cases show "
                    "the false-positive tumour volume instead of a Dice):\n\n"
                    + per_case_table(rows, ["baseline", "default", "baseline ×4 steps", "default ×4 steps"]))
        write_table("recipes_paired", "Paired differences (synthetic CT): per validation case, arm A minus arm B "
                    "averaged over the training seeds; 95 % bootstrap interval over validation cases. An interval "
                    "that contains 0 is a tie at this sample size.\n\n" + paired_table(rows))
    return rows


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
