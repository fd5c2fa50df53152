"""The benchmark scripts import and run one tiny case each, so they cannot rot (no timing asserted)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import bench_gpu  # noqa: E402
import bench_infer  # noqa: E402
import bench_preprocess  # noqa: E402
import bench_train  # noqa: E402
import common  # noqa: E402
import gpu_check  # noqa: E402
import lits_conventions  # noqa: E402
import real_liver  # noqa: E402
import study  # noqa: E402
import tumour_study  # noqa: E402

import unet_helpers as uh  # noqa: E402


@pytest.fixture()
def work(tmp_path, monkeypatch):
    for mod in (bench_preprocess, bench_train, study, tumour_study, bench_gpu, gpu_check, real_liver):
        monkeypatch.setattr(mod, "WORK", tmp_path)
    return tmp_path


def test_write_table_replaces_only_its_block(tmp_path):
    md = tmp_path / "B.md"
    md.write_text("# B\n<!-- a:start -->\nold\n<!-- a:end -->\n<!-- b:start -->\nkeep\n<!-- b:end -->\n")
    common.write_table("a", common.md_table(["x"], [[1]]), md)
    common.write_table("c", "new block", md)
    text = md.read_text()
    assert "old" not in text and "| 1 |" in text and "keep" in text and "<!-- c:start -->\nnew block" in text


def test_tiny_preprocess_train_infer(work):
    pre = bench_preprocess.run(n=2, shape=(48, 48, 8), image_size=24, repeats=1, write=False)
    assert pre["naive_s"] > 0 and pre["ours_s"] > 0 and pre["cached_s"] > 0
    tr = bench_train.run(image_size=32, base=4, depth=2, steps=2, repeats=1, n_cases=2, write=False)
    assert tr["ours"]["flops_per_step"] == tr["plain"]["flops_per_step"] > 0
    assert 0 <= tr["ours"]["data_wait"] < 1 and tr["peak_flops"] > 0
    win = bench_train.windows(roi=64, sizes=(32,), batch=2, steps=2, repeats=1, n_cases=2, write=False)
    assert set(win) == {32} and win[32]["before"] > 0 and win[32]["now"] > 0
    deep = bench_train.depths(roi=64, size=32, depths_=(3, 2), batch=2, steps=2, repeats=1, n_cases=2, write=False)
    assert set(deep) == {3, 2} and deep[3]["seconds"] > 0 and deep[2]["seconds"] > 0
    assert deep[3]["parameters"] > deep[2]["parameters"]  # each depth timed its own network
    inf = bench_infer.run(shape=(32, 32, 4), repeats=1, write=False)
    assert set(inf["quick"]) == {"batch_1_s", "batch_4_s", "batch_8_s", "batch_32_s"}
    assert all(t > 0 for t in inf["quick"].values())


def test_paired_comparison_of_arms():
    def row(arm, seed, tumour, liver):
        cases = [{"case": f"c{i}", "has_tumor": i < 3, "dice_tumor": t if i < 3 else None, "dice_liver": liver,
                  "fp_tumor_ml": 0.0} for i, t in enumerate(tumour + [None])]
        return {"arm": arm, "seed": seed, "per_case": cases}

    rows = [row("A", s, [0.5, 0.6, 0.7], 0.95) for s in (0, 1)] + [row("B", s, [0.4, 0.5, 0.6], 0.96)
                                                                   for s in (0, 1)]
    t = study.paired(rows, "A", "B")
    assert t["cases"] == 3 and t["seeds"] == 2 and t["a_better"] == 3 and t["b_better"] == 0
    assert abs(t["mean"] - 0.1) < 1e-9 and abs(t["low"] - 0.1) < 1e-9 and abs(t["high"] - 0.1) < 1e-9
    liver = study.paired(rows, "A", "B", "dice_liver")
    assert liver["cases"] == 4 and abs(liver["mean"] + 0.01) < 1e-9  # liver uses every case
    assert study.paired(rows, "A", "missing") is None


def test_a_recipe_against_itself_is_within_the_noise_of_training():
    """Two runs of one recipe: seed 0's models a little better on every case, seed 1's and 2's a little worse (the
    noise of training). Averaging each case over seeds and resampling cases only calls the difference significant;
    the paired interval, resampling seeds too, covers 0."""
    import numpy as np

    def row(arm, seed, shift):
        cases = [{"case": f"c{i}", "has_tumor": True, "dice_tumor": 0.5 + 0.01 * i + shift, "dice_liver": 0.9,
                  "pred_tumor_ml": 1.0} for i in range(12)]
        return {"arm": arm, "seed": seed, "per_case": cases}

    rows = [row("run 1", s, d) for s, d in ((0, 0.04), (1, -0.01), (2, 0.0))] + [row("run 2", s, 0.0) for s in range(3)]
    case_only = uh.bootstrap_ci(np.full(12, 0.01))  # each case's difference averaged over seeds: +0.01, no spread
    assert case_only[0] > 0  # "significant"
    d = study.paired(rows, "run 1", "run 2")
    assert d["mean"] == pytest.approx(0.01) and d["low"] < 0 < d["high"] and (d["seeds"], d["cases"]) == (3, 12)


def test_ratio_interval_and_lits_score_of_older_rows():
    same = [[0.5, 0.7]] * 3
    r = common.paired_ratio_bootstrap([[1.0, 1.4]] * 2, same)  # twice the score on every case and seed
    assert (r["ratio"], r["low"], r["high"]) == pytest.approx((2.0, 2.0, 2.0))
    r = common.paired_ratio_bootstrap([[0.6, 0.8], [0.4, 0.6]], same)  # seed noise: 1.2x and 0.8x the baseline
    assert r["ratio"] == pytest.approx(1.0) and r["low"] < 0.9 and r["high"] > 1.1
    old = [{"dice_tumor": None, "has_tumor": False, "pred_tumor_ml": 0.0},
           {"dice_tumor": None, "has_tumor": False, "pred_tumor_ml": 0.3},
           {"dice_tumor": 0.4, "has_tumor": True, "pred_tumor_ml": 2.0}]
    assert [common.case_score(c, "dice_tumor_lits") for c in old] == [1.0, 0.0, 0.4]  # LiTS's rule, by hand
    assert common.case_score({"dice_tumor_lits": 0.7}, "dice_tumor_lits") == 0.7


def test_lits_conventions_rescore_saved_rows_by_hand(tmp_path, monkeypatch):
    def row(arm, seed, fp_ml):  # two cases with tumour (Dice 0.6, 0.4) and a tumour-free one with fp_ml predicted
        cases = [{"case": "c0", "has_tumor": True, "dice_tumor": 0.6, "pred_tumor_ml": 2.0},
                 {"case": "c1", "has_tumor": True, "dice_tumor": 0.4, "pred_tumor_ml": 1.0},
                 {"case": "c2", "has_tumor": False, "dice_tumor": None, "pred_tumor_ml": fp_ml}]
        return {"arm": arm, "seed": seed, "set": "validation", "per_case": cases}

    path = tmp_path / "study.json"
    path.write_text(json.dumps([row("A", s, 0.0) for s in (0, 1)] + [row("B", s, 0.5) for s in (0, 1)]))
    monkeypatch.setattr(lits_conventions, "STUDIES", {"tiny": path})
    monkeypatch.setattr(lits_conventions, "PAIRS", [("A", "B")])
    text = lits_conventions.main(["--no-write"])["tiny"]
    # A: with tumour (0.6 + 0.4) / 2; LiTS (0.6 + 0.4 + 1) / 3; nnU-Net leaves c2 out: 0.5. Seeds agree, so the
    # intervals come from the cases: each extreme (one case drawn every time) has p = 1/4 (2 cases) or 1/27 (3
    # cases), above 0.025: the interval runs from the lowest case to the highest
    assert "| validation | A | 2 | 3 | 0.500 [0.400, 0.600] | 0.667 [0.400, 1.000] | 0.500 [0.400, 0.600] |" in text
    # B: a false tumour on c2 scores 0 in LiTS's and nnU-Net's conventions: 1/3 in both
    assert "| validation | B | 2 | 3 | 0.500 [0.400, 0.600] | 0.333 [0.000, 0.600] | 0.333 [0.000, 0.600] |" in text
    # per-case differences 0, 0, 1: resampling 3 cases leaves c2 out (mean 0) with p = (2/3)^3 = 0.30 > 0.025 and
    # draws it thrice (mean 1) with p = 1/27 = 0.037 > 0.025
    assert "| A | B | +0.000 [+0.000, +0.000] | +0.333 [+0.000, +1.000] |" in text


def test_tiny_tumour_study_budget_fair_and_kept_aside(work, tmp_path, monkeypatch):
    monkeypatch.setattr(uh, "CASCADE_MIN_STAGE1_STEPS", 0)  # a budget of a few steps: the stage-1 floor would bind
    out = tmp_path / "tumour.json"
    common_args = ["--seconds", "3", "--seeds", "0", "--batch", "2", "--train-cases", "3", "--val-cases", "2",
                   "--kept-cases", "2", "--shape", "48", "48", "12", "--base", "4", "--results", str(out),
                   "--runs", "runs_3s"]
    monkeypatch.setitem(tumour_study.BASE, "image_size", 32)
    monkeypatch.setattr(tumour_study, "RUNS", tumour_study.RUNS)  # main sets it; restored after the test
    # fixed steps, not 3 s of them: a slow machine's 8 steps leave stage 1 without a liver (then no stage 2 to probe)
    monkeypatch.setattr(study, "steps_for", lambda *a, **k: 48)
    rows = tumour_study.main(["--arms", "baseline", "default + liver-box cascade", "--no-write", *common_args])
    # the networks are kept in the folder --runs names, not in the default one (another budget's runs stay)
    assert (tmp_path / "runs_3s" / "default_+_liver-box_cascade_0" / "stage2" / "last.pt").is_file()
    assert not (tmp_path / "tumour_runs").exists()
    by_arm = {r["arm"]: r for r in rows}
    assert set(by_arm) == {"baseline", "default + liver-box cascade"}
    assert list(by_arm["baseline"]["steps"]) == ["stage1"]
    assert list(by_arm["default + liver-box cascade"]["steps"]) == ["stage1", "stage2"]  # both stages calibrated
    assert by_arm["default + liver-box cascade"]["roi_size"] == 32  # 0.6 x 48, rounded up to 32
    for r in rows:
        assert r["set"] == "validation" and r["seconds_budget"] == 3 and r["train_seconds"] > 0
        assert "median_tumor_volume_ratio" in r["summary"] and len(r["per_case"]) == 2
        assert r["real_ct_liver_dice"] is None or 0 <= r["real_ct_liver_dice"] <= 1  # None without ../shared
    tables: dict[str, str] = {}
    monkeypatch.setattr(tumour_study, "write_table", lambda name, text: tables.__setitem__(name, text))
    rows = tumour_study.main(["--kept-aside", "baseline", "default + liver-box cascade", "--training-cases", "baseline",
                              "--by-contrast", "default + liver-box cascade", *common_args])
    assert [r["arm"] for r in rows if r["set"] == "training cases"] == ["baseline"]
    kept = [r for r in rows if r["set"] == "kept-aside"]
    assert sorted(r["arm"] for r in kept) == ["baseline", "default + liver-box cascade"]  # stage 2 reloaded too
    assert tables["tumour_study"].count("| baseline |") == 3  # once per set: validation, kept aside, training
    assert "default + liver-box cascade" in tables["tumour_study_paired"]
    counted = [r for r in rows if r["set"].startswith("by contrast")]
    assert sorted(r["set"] for r in counted) == ["by contrast: training cases", "by contrast: validation"]
    for r in counted:
        assert all(0 <= g["found"] <= g["lesions"] and 0 <= g["hit_voxels"] <= g["voxels"]
                   for g in r["by_contrast"].values())
    assert tables["tumour_study_contrast"].count("default + liver-box cascade") == 2
    # an arm that changes only inference scores the trained arm's networks, with that arm's training fields
    monkeypatch.setitem(tumour_study.ARMS, "cascade, both stages' liver",
                        {**tumour_study.ARMS["default + liver-box cascade"], "average_liver": True,
                         "models_of": "default + liver-box cascade"})
    rows = tumour_study.main(["--arms", "cascade, both stages' liver", "--no-write", *common_args])
    both = next(r for r in rows if r["arm"] == "cascade, both stages' liver")
    source = by_arm["default + liver-box cascade"]
    assert both["models_of"] == source["arm"] and both["steps"] == source["steps"]
    assert both["train_seconds"] == source["train_seconds"] and len(both["per_case"]) == 2
    assert not (tmp_path / "runs_3s" / "cascade,_both_stages'_liver_0").exists()  # nothing trained for it
    # the test sets: generated from their own seeds, scored once per arm and seed
    rows = tumour_study.main(["--test", "baseline", *common_args])
    rows = tumour_study.main(["--test", "baseline", *common_args])
    assert sorted(r["set"] for r in rows if r["arm"] == "baseline" and r["set"].startswith("test")) == [
        "test", "test, hard lesions"]
    assert "**Test sets**" in tables["tumour_study"]
    with pytest.raises(ValueError, match="other settings"):  # resuming never mixes runs of another budget
        tumour_study.main([*common_args[:1], "7", *common_args[2:], "--no-write"])


def test_gpu_bench_runs_the_product_step_on_cpu(work):
    out = bench_gpu.run(image_size=32, batch=4, steps=3, device="cpu", shape=(48, 48, 12), preset="quick", workers=0)
    assert out["fp32+DataLoader"] > 0 and out["amp+channels_last+resident"] > 0 and out["speedup"] > 0
    assert out["evaluate 2 volumes s"] > 0 and out["fp32+DataLoader peak GiB"] is None  # no CUDA here


def test_gpu_check_smoke_runs_every_section_on_cpu(work):
    """``bench/gpu_check.py --smoke``: every section runs tiny on the CPU and its checks hold (none timed)."""
    res = gpu_check.main(["--smoke", "--out", str(work / "check.json"), "--budget-s", "1e9"])
    assert json.loads((work / "check.json").read_text())["total_seconds"] == res["total_seconds"]
    for name in gpu_check.SECTIONS:
        assert "error" not in res[name], (name, res[name].get("traceback"))
    assert res["environment"]["precision"] == "fp32" and res["card_16gb"] == {
        "skipped": "needs CUDA", "section_seconds": res["card_16gb"]["section_seconds"]}
    epochs = res["stage1_epoch"]
    assert {k for k in epochs if "/" in k} == {"fp32/gpu_resident", "fp32/cpu_pinned_readahead", "fp32/memory_mapped"}
    # the same seed and batches wherever the slices live: the same losses (fp32 on the CPU)
    assert epochs["fp32/memory_mapped"]["train_ce"] == pytest.approx(epochs["fp32/gpu_resident"]["train_ce"], rel=1e-5)
    ddp = res["ddp"]
    assert ddp["two_ranks_completed_ranks_agree"] and ddp["worker_error_reached_caller"]
    assert ddp["resumed_epochs"] == [1, 2] and ddp["resumed_processes"] == [1, 2]  # 1 process, then 2 ranks
    assert ddp["interrupt_workers_left"] == 0
    assert {"best.pt", "last.pt", "history.json", "history.csv"} <= set(ddp["files_written"])
    nb = res["notebook"]
    assert nb["default"]["preset"] == "quick" and nb["full_2_epochs"]["preset"] == "full"
    assert nb["full_cascade_4_epochs"]["cascade"] is True
    assert res["inference"]["stage1+mirrored_stage2"]["volumes_per_s"] > 0


def test_volume_ratio_split_by_how_well_a_case_is_segmented():
    def case(dice, ratio, has=True):
        return {"has_tumor": has, "dice_tumor": dice, "tumor_volume_ratio": ratio}
    rows = [{"arm": "baseline", "set": "validation", "per_case": [case(0.9, 1.1), case(0.85, 0.9), case(0.2, 0.1),
                                                                     case(float("nan"), 0.0, has=False)]},
            {"arm": "baseline", "set": "validation", "per_case": [case(0.5, 0.3), case(0.1, 0.5)]},
            {"arm": "baseline", "set": "kept-aside", "per_case": [case(0.95, 5.0)]}]  # other sets are not counted
    table = tumour_study.ratio_table(rows)
    # found well: ratios 1.1 and 0.9 -> median 1.00, range 0.90-1.10; the other three: 0.1, 0.3, 0.5 -> median 0.30
    assert "| baseline | 2 of 5 | 1.00 (0.90–1.10) | 0.30 |" in table
    assert "default" not in table.split("\n", 2)[2]  # arms without rows are left out


def test_lesions_by_contrast_pooled_over_seeds():
    def seed(hypo, faint, hyper):
        return {"arm": "baseline", "set": "by contrast: validation", "by_contrast": {
            g: dict(zip(("lesions", "found", "voxels", "hit_voxels"), v))
            for g, v in zip(("hypodense", "faint", "hyperdense"), (hypo, faint, hyper))}}
    rows = [seed((3, 2, 100, 60), (1, 0, 50, 0), (0, 0, 0, 0)), seed((2, 2, 50, 40), (1, 1, 50, 25), (1, 0, 20, 0)),
            {"arm": "baseline", "set": "validation", "per_case": []}]  # other sets are not counted
    table = tumour_study.contrast_table(rows)
    # hypodense: 2 + 2 found of 3 + 2, voxels (60 + 40) / 150; faint: 1 of 2, 25 / 100; hyperdense: 0 of 1, 0 / 20
    assert "| validation | baseline | 2 | 4 of 5, 0.67 | 1 of 2, 0.25 | 0 of 1, 0.00 |" in table
    assert "training cases" not in table


def test_new_arms_build_and_start_their_stages(work):
    deep = "stage 2 of depth 3 on 64² patches, stage 1 a fifth"
    cfg = {**tumour_study.BASE, **tumour_study.ARMS[deep]}
    assert study.stage_config(cfg, "stage1")["depth"] is None  # stage 1: depth 4
    assert study.stage_config(cfg, "stage2")["depth"] == 3 and study.stage_config(cfg, "stage2")["patch"]
    for name, depth in (("stage1", 4), ("stage2", 3)):  # checkpoints as a finished run leaves them
        folder = tumour_study.run_folder(deep, 0) / name
        folder.mkdir(parents=True)
        torch.save({"model": tumour_study.uh.UNet(3, 3, 4, depth).state_dict()}, folder / "last.pt")
    models = tumour_study.load_models(deep, 0, base=4)  # each stage rebuilt at its own depth
    assert models["stage1"].hparams["depth"] == 4 and models["stage2"].hparams["depth"] == 3
    warm = {**tumour_study.BASE, **tumour_study.ARMS["64² patches, a fifth, stage 2 from stage 1's weights"]}
    one = study.new_model(study.stage_config(warm, "stage1"), 0, 4)
    with torch.no_grad():
        for p in one.parameters():
            p.add_(1.0)  # unlike any fresh initialisation
    assert study.stage_init(warm, "stage2", {"stage1": one}) is one
    assert study.stage_init(warm, "stage1", {}) is None  # stage 1 always starts afresh
    assert study.stage_init(cfg, "stage2", models) is None  # as does stage 2 of an arm without stage2_init
    two = study.new_model(study.stage_config(warm, "stage2"), 0, 4, one)
    fresh = study.new_model(study.stage_config(warm, "stage2"), 0, 4)
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), two.state_dict().values()))
    assert not torch.equal(fresh.inc[0].weight, one.inc[0].weight)


def test_mirrored_arms_mirror_stage_2_only_and_are_scored_mirrored():
    """``stage2_mirror`` trains stage 2 (not stage 1) on mirrored windows and scores the arm with stage 2
    averaged over mirrors; an arm without it scores a plain stage 2."""
    arm = "lesion contrast, mirrored stage 2"
    cfg = {**tumour_study.BASE, **tumour_study.ARMS[arm]}
    tc = {name: study.train_config(study.stage_config(cfg, name), 0, 8, 40)
          for name in ("stage1", "stage2")}
    assert tc["stage2"].augment.mirror == 0.5 and tc["stage1"].augment.mirror == 0.0
    assert tc["stage2"].augment.lesion_p == tc["stage1"].augment.lesion_p == 0.5
    assert tc["stage2"].sampling.window == 64 and tc["stage1"].sampling.window is None
    plain = {**tumour_study.BASE, **tumour_study.ARMS["stage 2 on 64² patches, stage 1 a fifth"]}
    assert study.train_config(study.stage_config(plain, "stage2"), 0, 8, 40).augment.mirror == 0.0
    models = {"stage1": torch.nn.Identity(), "stage2": torch.nn.Identity()}
    assert tumour_study.stage2_of(arm, models, 160).mirror
    assert not tumour_study.stage2_of("stage 2 on 64² patches, stage 1 a fifth", models, 160).mirror
    assert tumour_study.stage2_of("baseline", {"stage1": torch.nn.Identity()}, None) is None


def test_arm_lesion_settings_reach_only_that_arms_training(work, tmp_path, monkeypatch):
    """An arm's ``lesion_settings`` change its own training configs (calibration and fit), no other arm's."""
    monkeypatch.setattr(uh, "CASCADE_MIN_STAGE1_STEPS", 0)  # 8 fake steps: the stage-1 floor would bind
    seen = []

    def fake_fit(cases, cfg, seed, batch, base, steps, out, init=None):
        seen.append(("fit", study.train_config(cfg, seed, batch, steps).augment.lesion_p))
        return study.new_model(cfg, seed, base)

    def fake_steps(seconds, cases, cfg, seed, batch, base, out):
        seen.append(("calibrate", study.train_config(cfg, seed, batch, 8).augment.lesion_p))
        return 8

    monkeypatch.setattr(study, "fit", fake_fit)
    monkeypatch.setattr(study, "steps_for", fake_steps)
    monkeypatch.setitem(tumour_study.BASE, "image_size", 32)
    arms = ["lesion contrast on every tumour slice", "64² patches, a fifth, lesion contrast"]
    rows = tumour_study.main(["--arms", *arms, "--no-write", "--seconds", "3", "--seeds", "0", "--batch", "2",
                              "--train-cases", "3", "--val-cases", "2", "--shape", "48", "48", "12", "--base", "4",
                              "--results", str(tmp_path / "t.json")])
    # both stages of the first arm with its p, then both of the next arm with the library's 0.5
    assert seen == [("calibrate", 1.0)] * 2 + [("fit", 1.0)] * 2 + [("calibrate", 0.5)] * 2 + [("fit", 0.5)] * 2
    assert [r.get("lesion_settings") for r in rows] == [{"p": 1.0}, {}]  # each row records its arm's settings


def test_hierarchical_bootstrap_holds_the_noise_of_training():
    """Two runs of one recipe differ by seed (training noise) more than by case: resampling cases alone would
    call the difference significant; resampling seeds too gives an interval that covers 0."""
    same_recipe = [[+0.1] * 10, [-0.1] * 10]  # seed 0's models a little better on every case, seed 1's worse
    d = common.hierarchical_bootstrap(same_recipe, n_boot=4000)
    assert d["mean"] == pytest.approx(0.0) and d["low"] <= -0.09 and d["high"] >= 0.09
    assert (d["seeds"], d["cases"]) == (2, 10)
    flat = common.hierarchical_bootstrap([[0.3] * 5] * 3)
    assert flat["mean"] == flat["low"] == flat["high"] == pytest.approx(0.3)


def test_hierarchical_bootstrap_matches_exact_enumeration():
    """2 seeds x 2 cases: the 16 equally likely resamples (seeds and cases each drawn with replacement),
    enumerated by hand, give the distribution of the mean; the bootstrap's percentiles must match it."""
    import itertools

    import numpy as np
    m = [[0.0, 1.0], [2.0, 5.0]]
    means = sorted(np.mean([m[s][c] for s in ss for c in cc])
                   for ss in itertools.product(range(2), repeat=2) for cc in itertools.product(range(2), repeat=2))
    # by hand: seeds (0,0): cases give 0, 0.5, 0.5, 1; (1,1): 2, 3.5, 3.5, 5; (0,1)/(1,0): 1, 2, 2, 3 each
    assert means == [0, 0.5, 0.5, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3.5, 3.5, 5]
    d = common.hierarchical_bootstrap(m, n_boot=20000, level=0.75)
    assert d["mean"] == pytest.approx(2.0)
    assert d["low"] == pytest.approx(0.5, abs=0.01) and d["high"] == pytest.approx(3.5, abs=0.01)


def test_tiny_real_liver_study_trains_scores_and_probes(work, synthetic_dir, tmp_path, monkeypatch):
    """bench/real_liver.py end to end on a tiny set in the real slices' layout: recipes at equal time, the stage-1
    floor turning a too-small cascade into one stage, the probes of a cascade, the steps curve and the tables."""
    monkeypatch.setattr(real_liver, "IMAGE_SIZE", 32)
    out = tmp_path / "real.json"
    args = ["--seconds", "2", "--seeds", "0", "--batch", "2", "--base", "4", "--data", str(synthetic_dir),
            "--results", str(out)]
    tables: dict[str, str] = {}
    monkeypatch.setattr(real_liver, "write_table", lambda name, text: tables.__setitem__(name, text))
    # a floor no 2 s run reaches on any machine, so the default's switch to one stage does not depend on speed
    monkeypatch.setattr(uh, "CASCADE_MIN_STAGE1_STEPS", 10**6)
    init_name = "cascade, stage 2 from stage 1's weights"
    monkeypatch.setitem(real_liver.RECIPES, init_name, {**real_liver.RECIPES[init_name], **real_liver.NO_FLOOR})
    rows = real_liver.main(["--recipes", "one-stage default", "default", "cascade, stage 1 half the time", init_name,
                            *args])
    by = {r["recipe"]: r for r in rows}
    assert by["one-stage default"]["roi_size"] is None and "probes" not in by["one-stage default"]
    # stage 1 cannot reach the floor: the default trains one stage
    assert by["default"]["roi_size"] is None and list(by["default"]["steps"]) == ["stage1"]
    half = by["cascade, stage 1 half the time"]  # no floor: two stages, and the probes
    assert half["roi_size"] == 64 and set(half["steps"]) == {"stage1", "stage2"}
    assert set(half["probes"]) == set(real_liver.PROBES)
    scored = set(half["per_case"])
    assert scored == set(by["default"]["per_case"]) and 1 <= len(scored) < 6  # the same scored patients
    for r in rows:
        assert all(0 <= v <= 1 for v in r["per_case"].values()) and r["train_seconds"] > 0
    assert tables["real_liver_2s"].count("| cascade, stage 1 half the time |") == 2  # the table and the probes
    init = by[init_name]
    assert init["roi_size"] == 64 and set(init["steps"]) == {"stage1", "stage2"}
    rescored = real_liver.main(["--probes", "--recipes", "cascade, stage 1 half the time", *args])
    again = next(r for r in rescored if r["recipe"] == "cascade, stage 1 half the time")
    assert again["per_case"] == half["per_case"] and "rescored" in again  # the same models, the same inference
    assert "rescored" not in next(r for r in rescored if r["recipe"] == init_name)
    curve = real_liver.main(["--steps-curve", "4", "8", *args])
    assert [r["steps"] for r in curve] == [4, 8] and "| 8 | 1 |" in tables["real_liver_steps"]


def test_study_budget_split_by_hand():
    """The studies split a budget as the product does. Here 500 s, stage 1 calibrated at 1 step/s and stage 2 at
    2 steps/s: a fifth gives stage 1 100 steps, a budget of 500 stage-1 steps; a floor of 240 gives stage 1 240
    and stage 2 the time of the other 260 (520 steps); a floor below the share changes nothing (stage 2: 400 s,
    800 steps); one above half the budget trains one stage for all 500 s."""
    rate = {"coarse": 4, "stage1": 1, "stage2": 2}

    def calibrate(name, seconds):
        return int(seconds * rate[name])

    cascade = {"cascade": True, "stage1_share": 0.2}
    assert study.budget_split({**cascade, "min_stage1_steps": 240}, calibrate, 500) == {"stage1": 240, "stage2": 520}
    assert study.budget_split({**cascade, "min_stage1_steps": 80}, calibrate, 500) == {"stage1": 100, "stage2": 800}
    assert study.budget_split({**cascade, "min_stage1_steps": 260}, calibrate, 500) == {"stage1": 500}
    assert study.budget_split({"cascade": False}, calibrate, 500) == {"stage1": 500}
    coarse = {"cascade": False, "stage1_share": 0.2, "coarse_size": 128}
    assert study.budget_split(coarse, calibrate, 500) == {"coarse": 400, "stage1": 400}  # 100 s x 4, 400 s x 1


def test_study_tversky_loss_weighs_false_calls_alpha_and_misses_beta_by_hand():
    """The Tversky arm's loss (alpha 0.3 on false calls, beta 0.7 on misses), smooth 0, on two pixels with softmax
    exactly p (logits = log p), targets 1 and 2: class 1 tp 0.5, fp 0.2, fn 0.5 -> 0.5 / (0.5 + 0.06 + 0.35)
    = 0.5 / 0.91 (swapped weights: 0.5 / 0.79); class 2 tp 0.7, fp 0.3, fn 0.3 -> 0.7 / 1.0; loss
    1 - (0.5 / 0.91 + 0.7) / 2 = 0.3753; CE (-log 0.5 - log 0.7) / 2."""
    p = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.2, 0.7]])  # pixel 0, pixel 1; classes 0, 1, 2
    logits, target = p.log().T.reshape(1, 3, 1, 2), torch.tensor([[[1, 2]]])
    total, parts = study.TverskyCELoss(smooth=0.0)(logits, target)
    assert parts["dice"].item() == pytest.approx(1 - (0.5 / 0.91 + 0.7) / 2, abs=1e-6)
    assert total.item() == pytest.approx((-math.log(0.5) - math.log(0.7)) / 2 + 1 - (0.5 / 0.91 + 0.7) / 2, abs=1e-6)
    dice = study.TverskyCELoss(0.5, 0.5, smooth=0.0)(logits, target)[1]["dice"]  # 0.5 / 0.5: the product's Dice
    assert dice.item() == pytest.approx(uh.make_loss(smooth=0.0)(logits, target)[1]["dice"].item(), abs=1e-7)


def test_study_strong_intensity_by_its_definition():
    """Every sample on (p 1): deviations from the image mean scaled by one factor k in [0.75, 1.25], then the
    image raised to one power g in [exp(-0.4), exp(0.4)]; p 0: the image passes unchanged."""
    x = torch.linspace(0.2, 0.8, 2 * 16 * 16).reshape(2, 1, 16, 16)  # stays in [0, 1] after the contrast
    xc = study.strong_intensity(x, torch.Generator().manual_seed(1), p=1.0, gamma=0.0)
    for i in range(2):  # least-squares factor, then every pixel must fit it
        m, d = x[i].mean(), x[i] - x[i].mean()
        k = ((xc[i] - m) * d).sum() / (d * d).sum()
        assert torch.allclose(xc[i], m + k * d, atol=1e-5)
        assert 0.75 <= k.item() <= 1.25 and abs(k.item() - 1) > 1e-3
    xg = study.strong_intensity(x, torch.Generator().manual_seed(2), p=1.0, contrast=0.0)
    for i in range(2):
        g = torch.log(xg[i]) / torch.log(x[i])
        assert torch.allclose(g, g.flatten()[0].expand_as(g), atol=1e-4)
        assert math.exp(-0.4) <= g.flatten()[0].item() <= math.exp(0.4) and abs(g.flatten()[0].item() - 1) > 1e-3
    assert torch.equal(study.strong_intensity(x, torch.Generator().manual_seed(1), p=0.0), x)
    x8 = x.repeat(4, 1, 1, 1)  # p 0.5: the samples left out pass exactly, the others change
    chosen = torch.rand(3, 8, 1, 1, 1, generator=torch.Generator().manual_seed(3))[0].flatten() < 0.5
    half = study.strong_intensity(x8, torch.Generator().manual_seed(3), p=0.5)
    assert 0 < chosen.sum() < 8
    assert all(torch.equal(half[i], x8[i]) != bool(chosen[i]) for i in range(8))


def test_study_arm_step_trains_the_tversky_arm_with_its_loss(monkeypatch):
    """The Tversky arm's step hands uh.train_step a state whose loss is the arm's (the run's own state keeps the
    product's loss, for validation); the arm's settings name the product's loss; other arms take the product's
    step."""
    cfg = {**tumour_study.BASE, **tumour_study.ARMS["lesion contrast, Tversky loss"]}
    assert study.train_config(cfg, 0, 8, 40).loss == "dice_ce"
    assert study.arm_step({**tumour_study.BASE, **tumour_study.ARMS["the default"]}, 0) is None
    state = uh.make_train_state(uh.UNet(1, 3, 4, 2), uh.TrainConfig(epochs=1, augment=None), 2, torch.device("cpu"))
    seen, product_step = [], uh.train_step
    monkeypatch.setattr(uh, "train_step", lambda s, *a: seen.append(type(s.loss_fn)) or product_step(s, *a))
    loss, _ = study.arm_step(cfg, 0)(state, torch.rand(2, 1, 16, 16), torch.randint(0, 3, (2, 16, 16)))
    assert seen == [study.TverskyCELoss] and type(state.loss_fn) is uh.DiceCELoss and torch.isfinite(loss)


def test_study_arms_calibrate_and_train_with_their_own_step(monkeypatch):
    """The calibration and the fit of an arm both hand uh.train the arm's step; the strong-augmentation arm's step
    gives uh.train_step the batch after study.strong_intensity (drawn from the arm's seed); an unknown loss is
    refused."""
    steps = []

    def fake_train(*args, step=None, **kw):
        steps.append(step)
        return [{"epoch_seconds": 1.0}] * 3

    monkeypatch.setattr(uh, "train", fake_train)
    monkeypatch.setattr(uh, "SliceSet", lambda *a, **k: None)
    monkeypatch.setattr(uh, "select_slices", lambda *a, **k: None)
    tversky = {**tumour_study.BASE, **tumour_study.ARMS["lesion contrast, Tversky loss"]}
    study.steps_for(10.0, [], tversky, 0, 8, 4, None)
    study.fit([], tversky, 0, 8, 4, 40, None)
    assert len(steps) == 2 and all(s is not None for s in steps)
    state = uh.make_train_state(uh.UNet(1, 3, 4, 2), uh.TrainConfig(epochs=1, augment=None), 2, torch.device("cpu"))
    seen = []
    monkeypatch.setattr(uh, "train_step", lambda st, *a: seen.append(type(st.loss_fn)))
    for s in steps:  # each a Tversky step
        s(state, torch.rand(2, 1, 16, 16), torch.randint(0, 3, (2, 16, 16)))
    assert seen == [study.TverskyCELoss] * 2
    strong = {**tumour_study.BASE, **tumour_study.ARMS["64² patches, a fifth, strong intensity augmentation"]}
    got, x = [], torch.rand(4, 1, 16, 16) * 0.6 + 0.2
    monkeypatch.setattr(uh, "train_step", lambda st, xb, *a: got.append((type(st.loss_fn), xb)))
    study.arm_step(strong, 5)(state, x, torch.zeros(4, 16, 16, dtype=torch.long))
    expected = study.strong_intensity(x, torch.Generator().manual_seed(5), **study.STRONG_AUGMENT)
    assert got[0][0] is uh.DiceCELoss and torch.equal(got[0][1], expected) and not torch.equal(expected, x)
    with pytest.raises(ValueError, match="an arm's loss must be one of"):
        study.train_config({**tversky, "loss": "focal_dice"}, 0, 8, 40)
