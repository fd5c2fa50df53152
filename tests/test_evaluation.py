"""Evaluation API: overlap counts, Dice, surface distances, per-case scores, lesion detection, summaries,
bootstrap intervals, post-processing, case splits, fold gathering and saving predictions.

Expected values are worked out by hand (arithmetic in the comments) or by an independent implementation
(MONAI for Dice / HD95 / ASSD, scipy.stats.bootstrap for the bootstrap), never by the code under test.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import write_nifti
from scipy import ndimage

import unet_helpers as uh

NAN = float("nan")


# ---------------------------------------------------------------- helpers
def line(values: Sequence[int]) -> np.ndarray:
    """A (X, 1, 1) uint8 label volume: every voxel of a 1-voxel-thick line is a surface voxel."""
    return np.asarray(values, np.uint8).reshape(-1, 1, 1)


def isnan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)


def natural(text: str) -> list:
    """Independent natural sort key ("c2" before "c10")."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def lesion(volume_ml: float, detected: bool, touched: bool) -> dict:
    """One reference lesion of a hand-built :func:`uh.lesion_detection` result."""
    return {"volume_ml": volume_ml, "detected": detected, "detected_any": touched, "iou": NAN}


def one_hot(mask: np.ndarray):
    import torch

    m = torch.as_tensor(np.asarray(mask, bool))
    return torch.stack([~m, m]).float()[None]  # (1, 2, X, Y, Z)


def blob(shape: tuple[int, int, int], seed: int, keep: float) -> np.ndarray:
    """An irregular mask (smoothed noise above a quantile), 2 voxels clear of the array border."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 1.5)
    mask = noise > np.quantile(noise, 1 - keep)
    mask[:2], mask[-2:], mask[:, :2], mask[:, -2:], mask[:, :, :2], mask[:, :, -2:] = (False,) * 6
    assert mask.sum() > 10
    return mask


# ---------------------------------------------------------------- overlap counts and Dice
def test_overlap_counts_by_hand():
    pred = np.array([1, 1, 0, 0, 1, 2])   # castable to bool: 2 -> True
    truth = np.array([1, 0, 1, 0, 2, 0])
    # tp: idx 0, 4 -> 2; fp: idx 1, 5 -> 2; fn: idx 2 -> 1
    assert tuple(uh.overlap_counts(pred, truth)) == (2, 2, 1)
    assert tuple(uh.overlap_counts(np.zeros(4), np.zeros(4))) == (0, 0, 0)
    assert tuple(uh.overlap_counts(np.ones(3, bool), np.zeros(3, bool))) == (0, 3, 0)


def test_dice_by_hand_and_empty():
    pred = np.array([1, 1, 0, 0, 1], bool)
    truth = np.array([1, 0, 1, 0, 1], bool)
    assert uh.dice(pred, truth) == pytest.approx(2 / 3)  # 2*2 / (2*2 + 1 + 1)
    assert isnan(uh.dice(np.zeros(3, bool), np.zeros(3, bool)))
    assert uh.dice(np.zeros(3, bool), np.zeros(3, bool), empty=1.0) == 1.0
    assert uh.dice(np.zeros(3, bool), np.ones(3, bool)) == 0.0  # one side empty: 0, not `empty`
    assert uh.dice(truth, truth) == 1.0


def test_dice_matches_monai():
    monai_metrics = pytest.importorskip("monai.metrics")
    a, b = blob((18, 16, 10), 1, 0.3), blob((18, 16, 10), 2, 0.3)
    expected = float(monai_metrics.compute_dice(one_hot(a), one_hot(b), include_background=False))
    assert uh.dice(a, b) == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------- surface distances
def test_surface_distances_single_voxels_anisotropic():
    p, t = np.zeros((5, 5, 7), bool), np.zeros((5, 5, 7), bool)
    p[2, 2, 1], t[2, 2, 5] = True, True
    # 4 voxels apart along z at 2.5 mm: 10 mm in both directions
    assert uh.surface_distances(p, t, (1.0, 1.0, 2.5)) == pytest.approx((10.0, 10.0))
    p2, t2 = np.zeros((5, 5, 3), bool), np.zeros((5, 5, 3), bool)
    p2[1, 1, 1], t2[3, 2, 1] = True, True
    # dx = 2 * 0.5 = 1 mm, dy = 1 * 2 = 2 mm -> sqrt(5)
    assert uh.surface_distances(p2, t2, (0.5, 2.0, 1.0)) == pytest.approx((math.sqrt(5), math.sqrt(5)))


def test_surface_distances_parallel_slabs():
    p, t = np.zeros((6, 6, 10), bool), np.zeros((6, 6, 10), bool)
    p[1:5, 1:5, 2], t[1:5, 1:5, 6] = True, True
    # every slab voxel is surface; each faces the other slab 4 slices x 1.5 mm = 6 mm away
    assert uh.surface_distances(p, t, (1.0, 1.0, 1.5)) == pytest.approx((6.0, 6.0))


def test_surface_distances_asymmetric_percentile():
    p, t = np.zeros((3, 3, 9), bool), np.zeros((3, 3, 9), bool)
    t[1, 1, 2:5] = True  # z = 2, 3, 4
    p[1, 1, 6] = True
    # spacing z 2 mm. p->t: [2 slices] = [4 mm]; t->p: [4, 3, 2 slices] = [8, 6, 4] mm
    # 95th pct of [4, 6, 8] (linear): pos 0.95*2 = 1.9 -> 6 + 0.9*2 = 7.8; of [4] -> 4. HD95 = 7.8
    # ASSD = (4 + 8 + 6 + 4) / 4 = 5.5
    hd, assd = uh.surface_distances(p, t, (1.0, 1.0, 2.0))
    assert hd == pytest.approx(7.8)
    assert assd == pytest.approx(5.5)
    assert uh.surface_distances(t, p, (1.0, 1.0, 2.0)) == pytest.approx((7.8, 5.5))  # symmetric


def test_surface_distances_shifted_lines():
    # truth x = 0..4, pred x = 1..5, spacing x 2 mm; all voxels are surface
    # pred->truth [0,0,0,0,2]: 95th pct pos 3.8 -> 0.8*2 = 1.6; same the other way. ASSD = (2+2)/10 = 0.4
    t = line([1, 1, 1, 1, 1, 0, 0, 0])
    p = line([0, 1, 1, 1, 1, 1, 0, 0])
    assert uh.surface_distances(p, t, (2.0, 1.0, 1.0)) == pytest.approx((1.6, 0.4))


def test_surface_distances_identical_and_empty():
    a = blob((12, 12, 8), 5, 0.3)
    assert uh.surface_distances(a, a, (0.7, 0.7, 3.0)) == (0.0, 0.0)
    empty = np.zeros_like(a)
    for p, t in ((a, empty), (empty, a), (empty, empty)):
        hd, assd = uh.surface_distances(p, t, (1.0, 1.0, 1.0))
        assert isnan(hd)
        assert isnan(assd)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("shape,spacing,seeds,keep", [
    ((20, 18, 12), (0.7, 0.9, 2.5), (1, 2), (0.25, 0.25)),
    ((16, 22, 10), (1.3, 0.6, 4.0), (3, 4), (0.1, 0.4)),
    ((14, 14, 14), (1.0, 1.0, 1.0), (5, 6), (0.05, 0.3)),
])
def test_surface_distances_match_monai(shape, spacing, seeds, keep):
    monai_metrics = pytest.importorskip("monai.metrics")
    p, t = blob(shape, seeds[0], keep[0]), blob(shape, seeds[1], keep[1])
    hd_ref = float(monai_metrics.compute_hausdorff_distance(one_hot(p), one_hot(t), include_background=False,
                                                            percentile=95, spacing=list(spacing)))
    assd_ref = float(monai_metrics.compute_average_surface_distance(one_hot(p), one_hot(t), include_background=False,
                                                                    symmetric=True, spacing=list(spacing)))
    hd, assd = uh.surface_distances(p, t, spacing)
    assert hd > 0 and assd > 0
    assert hd == pytest.approx(hd_ref, abs=1e-6)  # MONAI returns float32: agreement to its precision
    assert assd == pytest.approx(assd_ref, abs=1e-6)


# ---------------------------------------------------------------- score_case
def test_score_case_with_tumour_by_hand():
    # idx:   0 1 2 3 4 5 6 7 8 9
    truth = line([1, 1, 1, 2, 2, 0, 0, 0, 0, 0])
    pred = line([0, 1, 1, 1, 2, 2, 0, 0, 0, 0])
    spacing = (2.0, 1.0, 1.0)  # voxel 2 mm^3 = 0.002 mL
    r = uh.score_case(pred, truth, spacing)
    assert r["dice_liver"] == pytest.approx(2 / 3)  # T {0,1,2}, P {1,2,3}: 2*2 / (3+3)
    assert r["dice_tumor"] == pytest.approx(0.5)  # T {3,4}, P {4,5}: 2*1 / (2+2)
    assert r["dice_tumor_all_cases"] == pytest.approx(0.5)
    assert r["dice_liver_lits"] == pytest.approx(0.8)  # T {0..4}, P {1..5}: 2*4 / (5+5)
    assert r["dice_mean"] == pytest.approx(7 / 12)  # (2/3 + 1/2) / 2
    assert r["has_tumor"]
    assert r["tumor_ml"] == pytest.approx(0.004)  # 2 voxels
    assert r["pred_tumor_ml"] == pytest.approx(0.004)
    assert r["fp_tumor_ml"] == pytest.approx(0.002)  # idx 5
    assert r["tumor_volume_ratio"] == pytest.approx(1.0)
    # LiTS liver lines shifted by one voxel (2 mm): pct of [0,0,0,0,2] at pos 3.8 = 1.6; ASSD 4/10
    assert r["hd95_liver_lits_mm"] == pytest.approx(1.6)
    assert r["assd_liver_lits_mm"] == pytest.approx(0.4)
    # tumour {3,4} vs {4,5}: directed [0, 2] -> pct pos 0.95 = 1.9; ASSD (2+2)/4 = 1
    assert r["hd95_tumor_mm"] == pytest.approx(1.9)
    assert r["assd_tumor_mm"] == pytest.approx(1.0)
    # one reference lesion, touched by one predicted lesion with IoU 1/3: not detected (LiTS: IoU > 0.5)
    assert (r["n_lesions"], r["n_lesion_groups_detected"], r["n_lesions_detected_any"]) == (1, 0, 1)
    assert (r["n_pred_lesions"], r["n_pred_lesions_matched"]) == (1, 1)
    assert r["dice_tumor_lits"] == pytest.approx(0.5) and r["tumor_rvd"] == 0.0
    assert r["tumor_burden_error"] == 0.0  # burden 2/5 in both: label 2 over label >= 1
    assert (r["tp_tumor"], r["fp_tumor"], r["fn_tumor"]) == (1, 1, 1)


def test_score_case_tumour_free_with_false_positive():
    truth = line([1, 1, 1, 0, 0, 0])
    pred = line([1, 1, 2, 0, 0, 0])
    r = uh.score_case(pred, truth, (2.0, 1.0, 1.0))
    assert r["dice_liver"] == pytest.approx(0.8)  # T {0,1,2}, P {0,1}: 2*2 / (3+2)
    assert isnan(r["dice_tumor"])
    assert r["dice_tumor_all_cases"] == 0.0  # nnU-Net: a FP tumour on a tumour-free case scores 0
    assert r["dice_tumor_lits"] == 0.0  # LiTS too
    assert r["tumor_burden_error"] == pytest.approx(1 / 3)  # predicted 1 tumour voxel of 3, true 0
    assert r["dice_liver_lits"] == 1.0
    assert isnan(r["dice_mean"])
    assert not r["has_tumor"]
    assert r["tumor_ml"] == 0.0
    assert r["pred_tumor_ml"] == pytest.approx(0.002)
    assert r["fp_tumor_ml"] == pytest.approx(0.002)
    assert isnan(r["tumor_volume_ratio"])
    assert isnan(r["hd95_tumor_mm"])
    assert isnan(r["assd_tumor_mm"])
    assert (r["hd95_liver_lits_mm"], r["assd_liver_lits_mm"]) == (0.0, 0.0)
    assert (r["n_lesions"], r["n_lesion_groups_detected"]) == (0, 0)
    assert (r["n_pred_lesions"], r["n_pred_lesions_matched"]) == (1, 0)


def test_score_case_tumour_free_without_prediction_and_missed_tumour():
    clean = line([1, 1, 1, 0])
    r = uh.score_case(clean, clean, (1.0, 1.0, 1.0))
    assert isnan(r["dice_tumor"])
    assert isnan(r["dice_tumor_all_cases"])  # no tumour anywhere: not scored
    assert r["dice_tumor_lits"] == 1.0  # LiTS: no tumour anywhere scores 1
    assert isnan(r["dice_mean"])
    assert r["dice_liver"] == 1.0

    truth = line([1, 1, 2, 2, 0, 0])
    pred = line([1, 1, 1, 1, 0, 0])  # tumour called liver
    r = uh.score_case(pred, truth, (1.0, 1.0, 1.0))
    assert r["dice_tumor"] == 0.0
    assert r["dice_tumor_all_cases"] == 0.0
    assert r["dice_liver"] == pytest.approx(2 / 3)  # T {0,1}, P {0..3}: 2*2 / (2+4)
    assert r["dice_liver_lits"] == 1.0
    assert r["dice_mean"] == pytest.approx(1 / 3)  # (2/3 + 0) / 2
    assert r["tumor_volume_ratio"] == 0.0
    assert isnan(r["hd95_tumor_mm"])  # prediction has no tumour
    assert (r["n_lesions"], r["n_lesion_groups_detected"], r["n_pred_lesions"]) == (1, 0, 0)


def test_score_case_empty_liver_prediction():
    truth = line([1, 1, 1, 0])
    r = uh.score_case(line([0, 0, 0, 0]), truth, (1.0, 1.0, 1.0))
    assert r["dice_liver"] == 0.0
    assert r["dice_liver_lits"] == 0.0
    assert isnan(r["hd95_liver_lits_mm"])
    assert isnan(r["assd_liver_lits_mm"])


# ---------------------------------------------------------------- lesion detection (LiTS's rule)
def test_match_lesions_merges_and_splits_by_hand():
    # rows: predicted lesions, columns: reference lesions, values: overlapping voxels
    assert uh.match_lesions(np.array([[5, 3, 0], [0, 4, 0], [0, 0, 0]])) == [([0], [0]), ([1], [1])]  # G1 -> P1 (4 > 3)
    assert uh.match_lesions(np.array([[2, 2], [0, 0]])) == [([0], [0, 1])]  # one prediction over both: merged
    assert uh.match_lesions(np.array([[4], [6]])) == [([0, 1], [0])]  # one lesion in two pieces: the pieces merged
    # G0 and G1 both overlap P1 most: merged under P1; P0 overlaps that merged lesion most (1 vs nothing): it joins
    assert uh.match_lesions(np.array([[1, 0], [3, 5]])) == [([0, 1], [0, 1])]
    assert uh.match_lesions(np.zeros((2, 0), int)) == [] and uh.match_lesions(np.zeros((0, 3), int)) == []


def test_lesion_detection_merged_prediction():
    truth, pred = np.zeros((10, 4, 3), np.uint8), np.zeros((10, 4, 3), np.uint8)
    truth[:, :, 0] = pred[:, :, 0] = 1  # liver: never a lesion
    truth[1:3, 1:3, 1] = 2  # L1: 4 voxels
    truth[6:9, 1:3, 1] = 2  # L2: 6 voxels
    pred[1:9, 1:3, 1] = 2  # one blob over both: 8*2 = 16 voxels
    out = uh.lesion_detection(pred, truth, (2.0, 2.0, 2.5))  # voxel 10 mm^3 = 0.01 mL
    l1, l2 = out["lesions"]
    assert (l1["volume_ml"], l2["volume_ml"]) == (pytest.approx(0.04), pytest.approx(0.06))
    # merged: (L1 + L2) against the blob: IoU 10 / 16 > 0.5, so both are found (each alone: 4/16, 6/16)
    assert l1["detected"] and l2["detected"] and l1["iou"] == l2["iou"] == pytest.approx(10 / 16)
    (group,) = out["groups"]
    assert (group["n_ref"], group["n_pred"], group["detected"]) == (2, 1, True)
    assert group["dice"] == pytest.approx(20 / 26)  # 2 * 10 / (16 + 10)
    assert (out["n_pred"], out["n_pred_matched"]) == (1, 1)
    s = uh.lesion_summary([out])  # LiTS: one true positive for the group, so one of two lesions counts as found
    assert (s["lesion_recall"], s["lesion_precision"], s["lesion_recall_any_overlap"]) == (0.5, 1.0, 1.0)


def test_lesion_detection_split_prediction_and_false_positive():
    truth, pred = np.zeros((12, 6, 4), np.uint8), np.zeros((12, 6, 4), np.uint8)
    truth[2:8, 2:4, 1:3] = 2  # 6*2*2 = 24 voxels
    pred[2:4, 2:4, 1:3] = 2  # piece A: 8 voxels
    pred[6:8, 2:4, 1:3] = 2  # piece B: 8 voxels (gap x = 4, 5: not connected to A)
    pred[10:12, 4:6, 3] = 2  # false positive, far away: 4 voxels
    out = uh.lesion_detection(pred, truth, (1.0, 1.0, 1.0))
    (les,) = out["lesions"]
    assert les["detected"] and les["detected_any"] and les["iou"] == pytest.approx(16 / 24)  # both pieces together
    assert les["volume_ml"] == pytest.approx(0.024)
    (group,) = out["groups"]
    assert (group["n_ref"], group["n_pred"]) == (1, 2) and group["dice"] == pytest.approx(0.8)  # 32 / 40
    assert (out["n_pred"], out["n_pred_matched"]) == (3, 2)
    s = uh.lesion_summary([out])  # LiTS: one true positive for the two pieces, two false ones (a piece, the blob)
    assert (s["lesion_recall"], s["lesion_precision"]) == (1.0, pytest.approx(1 / 3))
    assert s["lesion_precision_any_overlap"] == pytest.approx(2 / 3)
    stricter = uh.lesion_detection(pred, truth, (1.0, 1.0, 1.0), iou_threshold=0.7)
    assert not stricter["lesions"][0]["detected"] and not stricter["groups"][0]["detected"]  # 2/3 < 0.7


def test_lesion_detection_touch_is_not_a_detection():
    truth, pred = np.zeros((12, 5, 4), np.uint8), np.zeros((12, 5, 4), np.uint8)
    truth[2:4, 2:4, 1:3] = 2  # 8 voxels
    pred[4:10, 2:4, 1:3] = 2  # a 24-voxel false blob beside it ...
    pred[3, 2, 1] = 2  # ... touching it by one voxel: one 25-voxel component
    out = uh.lesion_detection(pred, truth, (1.0, 1.0, 1.0))
    (les,) = out["lesions"]
    assert les["detected_any"] and not les["detected"]
    assert les["iou"] == pytest.approx(1 / 32)  # 1 / (8 + 25 - 1)
    assert (out["n_pred"], out["n_pred_matched"]) == (1, 1)
    s = uh.lesion_summary([out])
    assert (s["lesion_recall"], s["lesion_precision"]) == (0.0, 0.0)
    assert (s["lesion_recall_any_overlap"], s["lesion_precision_any_overlap"]) == (1.0, 1.0)


def test_lesion_detection_faces_connect_corners_do_not_and_half_is_not_enough():
    truth, pred = np.zeros((9, 9, 4), np.uint8), np.zeros((9, 9, 4), np.uint8)
    truth[1, 1, 1] = truth[2, 2, 2] = 2  # corner contact only: two lesions (LiTS labels by faces)
    pred[2, 2, 2] = 2  # the second one exactly
    pred[6, 6, 1] = pred[7, 7, 2] = 2  # a diagonal false positive: two predicted lesions
    out = uh.lesion_detection(pred, truth, (0.7, 0.8, 5.0))  # voxel 2.8 mm^3
    assert [les["detected"] for les in out["lesions"]] == [False, True]
    assert out["lesions"][1]["volume_ml"] == pytest.approx(2.8 / 1000)
    assert out["n_pred"] == 3 and [g["detected"] for g in out["groups"]] == [True]
    truth, pred = np.zeros((4, 3, 3), np.uint8), np.zeros((4, 3, 3), np.uint8)
    truth[1:3, 1, 1] = 2
    pred[1, 1, 1] = 2  # IoU 1/2: LiTS asks for more than half
    (les,) = uh.lesion_detection(pred, truth, (1.0, 1.0, 1.0))["lesions"]
    assert les["iou"] == pytest.approx(0.5) and not les["detected"] and les["detected_any"]


def test_lesion_detection_missed_lesion_and_liver_does_not_count():
    truth, pred = np.zeros((6, 6, 6), np.uint8), np.zeros((6, 6, 6), np.uint8)
    truth[1:4, 1:2, 2] = 2  # 3 voxels
    pred[1:4, 1:2, 2] = 1  # predicted as liver: not a hit
    out = uh.lesion_detection(pred, truth, (0.7, 0.8, 5.0))
    (les,) = out["lesions"]
    assert les["volume_ml"] == pytest.approx(3 * 0.7 * 0.8 * 5.0 / 1000)  # 0.0084 mL
    assert not les["detected"] and not les["detected_any"] and les["iou"] == 0.0
    assert (out["groups"], out["n_pred"], out["n_pred_matched"]) == ([], 0, 0)
    none = uh.lesion_detection(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), (1, 1, 1))
    assert (none["lesions"], none["groups"], none["n_pred"], none["n_pred_matched"]) == ([], [], 0, 0)


# ---------------------------------------------------------------- lesion summary
def test_lesion_summary_pooled_by_hand():
    def group(n_ref, n_pred, dice, detected):
        return {"n_ref": n_ref, "n_pred": n_pred, "iou": NAN, "dice": dice, "detected": detected}

    results = [
        {"lesions": [lesion(0.5, True, True), lesion(5.0, False, False)], "groups": [group(1, 1, 0.75, True)],
         "n_pred": 2, "n_pred_matched": 1},
        {"lesions": [lesion(20.0, True, True), lesion(1.0, True, True), lesion(10.0, False, True)],
         "groups": [group(2, 1, 8 / 9, True), group(1, 2, 6 / 13, False)],
         "n_pred": 3, "n_pred_matched": 3},
        {"lesions": [], "groups": [], "n_pred": 1, "n_pred_matched": 0},
    ]
    s = uh.lesion_summary(results)
    # 5 reference lesions, 4 touched; 6 predicted, 4 touching a lesion; 2 detected groups: 2 true positives
    assert s["lesion_recall"] == pytest.approx(0.4)
    assert s["lesion_precision"] == pytest.approx(1 / 3)
    assert s["lesion_f1"] == pytest.approx(4 / 11)  # 2 * 0.4 * 1/3 / (0.4 + 1/3) = (4/15) / (11/15)
    assert s["lesion_recall_any_overlap"] == pytest.approx(0.8)
    assert s["lesion_precision_any_overlap"] == pytest.approx(2 / 3)
    assert s["lesion_f1_any_overlap"] == pytest.approx(8 / 11)  # (16/15) / (22/15)
    assert s["lesion_dice"] == pytest.approx(59 / 72)  # (3/4 + 8/9) / 2 over the detected groups
    # bins: <1 {0.5: found}; 1-10 (inclusive) {5.0 missed, 1.0 found, 10.0 missed}; >10 {20.0 found}
    assert s["lesion_recall_by_volume"] == pytest.approx({"<1 mL": 1.0, "1-10 mL": 1 / 3, ">10 mL": 1.0})
    assert dict(s["lesion_count_by_volume"]) == {"<1 mL": 1, "1-10 mL": 3, ">10 mL": 1}


def test_lesion_contrast_and_recall_by_contrast_group_by_hand():
    """Liver at 100 HU (its median); three lesions at 50, 110 and 150 HU: -50 (hypodense), +10 (within the 15 HU
    band: faint), +50 (hyperdense). The prediction finds the first only."""
    truth = np.zeros((12, 4, 4), np.uint8)
    hu = np.zeros(truth.shape, np.float32)
    truth[:, 1:3, 1:3], hu[:, 1:3, 1:3] = 1, 100.0
    for x, level in ((1, 50.0), (5, 110.0), (9, 150.0)):  # one 2-voxel lesion per level, apart from the others
        truth[x:x + 2, 1, 1], hu[x:x + 2, 1, 1] = 2, level
    pred = truth.copy()
    pred[5:7, 1, 1] = pred[9:11, 1, 1] = 1
    det = uh.lesion_detection(pred, truth, (1.0, 1.0, 1.0), hu=hu)
    assert [les["contrast_hu"] for les in det["lesions"]] == pytest.approx([-50.0, 10.0, 50.0])
    assert [les["detected"] for les in det["lesions"]] == [True, False, False]
    s = uh.lesion_summary([det])
    assert s["lesion_recall_by_contrast"] == {"hypodense": 1.0, "faint": 0.0, "hyperdense": 0.0}
    assert s["lesion_count_by_contrast"] == {"hypodense": 1, "faint": 1, "hyperdense": 1}
    assert "contrast_hu" not in uh.lesion_detection(pred, truth, (1.0, 1.0, 1.0))["lesions"][0]  # without the CT
    assert all(isnan(v) for v in uh.lesion_summary([uh.lesion_detection(pred, truth, (1, 1, 1))])[
        "lesion_recall_by_contrast"].values())  # and then no group holds a lesion


def test_lesion_summary_empty_and_degenerate():
    def case(lesions, n_pred):
        return {"lesions": lesions, "groups": [], "n_pred": n_pred, "n_pred_matched": 0}

    s = uh.lesion_summary([case([], 0)])
    for key in ("lesion_recall", "lesion_precision", "lesion_f1", "lesion_recall_any_overlap", "lesion_dice"):
        assert isnan(s[key]), key
    assert all(isnan(v) for v in s["lesion_recall_by_volume"].values())
    assert dict(s["lesion_count_by_volume"]) == {"<1 mL": 0, "1-10 mL": 0, ">10 mL": 0}

    only_fp = uh.lesion_summary([case([], 2)])
    assert isnan(only_fp["lesion_recall"])
    assert only_fp["lesion_precision"] == 0.0
    assert only_fp["lesion_f1"] == 0.0  # on counts: 2TP / (2TP + FP + FN) = 0 / 2

    all_missed = uh.lesion_summary([case([lesion(0.2, False, False)], 1)])
    assert all_missed["lesion_recall"] == 0.0
    assert all_missed["lesion_precision"] == 0.0
    assert all_missed["lesion_f1"] == 0.0  # P + R == 0: nothing found, 2TP / (2TP + FP + FN) = 0
    none_predicted = uh.lesion_summary([case([lesion(3.0, False, False)], 0)])
    assert isnan(none_predicted["lesion_precision"]) and none_predicted["lesion_f1"] == 0.0  # 0 / (0 + 0 + 1)
    assert all_missed["lesion_recall_by_volume"]["<1 mL"] == 0.0
    assert isnan(all_missed["lesion_recall_by_volume"]["1-10 mL"])  # empty bin
    assert isnan(all_missed["lesion_recall_by_volume"][">10 mL"])


# ---------------------------------------------------------------- bootstrap
def test_bootstrap_matches_scipy():
    from scipy import stats

    x = np.random.default_rng(42).normal(0.75, 0.15, 20)
    ref = stats.bootstrap((x,), np.mean, method="percentile", confidence_level=0.95, n_resamples=20000,
                          rng=np.random.default_rng(1)).confidence_interval
    lo, hi = uh.bootstrap_ci(x, n_boot=10000, seed=0)
    assert lo == pytest.approx(ref.low, abs=0.01)
    assert hi == pytest.approx(ref.high, abs=0.01)
    assert lo < x.mean() < hi


def test_bootstrap_discrete_by_hand():
    # [0, 1]: resample means 0, 0.5, 1 with p 1/4, 1/2, 1/4 -> 2.5th pct 0, 97.5th pct 1
    assert uh.bootstrap_ci([0.0, 1.0], n_boot=10000, seed=0) == pytest.approx((0.0, 1.0))
    # [0, 0, 0, 1]: mean = k/4, k ~ Bin(4, 1/4). P(k=0) = 81/256 ~ 0.32 -> low 0;
    # P(k <= 2) = 243/256 ~ 0.949 < 0.975 < P(k <= 3) = 255/256 -> high 0.75
    assert uh.bootstrap_ci([0.0, 0.0, 0.0, 1.0], n_boot=10000, seed=0) == pytest.approx((0.0, 0.75))


def test_bootstrap_edge_cases_and_determinism():
    ci = uh.bootstrap_ci([NAN, NAN])
    assert isnan(ci[0]) and isnan(ci[1])
    ci = uh.bootstrap_ci([])
    assert isnan(ci[0]) and isnan(ci[1])
    assert uh.bootstrap_ci([0.42]) == pytest.approx((0.42, 0.42))
    assert uh.bootstrap_ci([NAN, 0.42, NAN]) == pytest.approx((0.42, 0.42))
    assert uh.bootstrap_ci([0.3] * 7) == pytest.approx((0.3, 0.3))
    x = list(np.random.default_rng(7).uniform(0, 1, 15))
    assert uh.bootstrap_ci(x, seed=3) == uh.bootstrap_ci(x, seed=3)
    assert uh.bootstrap_ci(x, seed=3) != uh.bootstrap_ci(x, seed=4)
    lo, hi = uh.bootstrap_ci(x + [NAN, NAN], seed=3)  # NaNs dropped first
    assert (lo, hi) == pytest.approx(uh.bootstrap_ci(x, seed=3))
    assert min(x) <= lo < float(np.mean(x)) < hi <= max(x)
    lo50, hi50 = uh.bootstrap_ci(x, seed=3, level=0.5)
    assert lo <= lo50 < hi50 <= hi
    assert hi50 - lo50 < hi - lo


# ---------------------------------------------------------------- summarize
CASES = {  # name: (truth, pred), lines of voxels 1 mm wide (0.001 mL)
    "perfect": ([1, 1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 2, 2, 0, 0]),
    "fp_tumor": ([1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 2, 2, 0, 0, 0]),  # tumour-free, FP tumour
    "empty_pred": ([1, 1, 2, 2, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]),  # nothing predicted
    "over": ([1, 1, 1, 2, 0, 0, 0, 0], [1, 1, 1, 2, 2, 2, 0, 0]),  # tumour 3x too big
}


def _summary_cases(names: Sequence[str] = tuple(CASES)) -> tuple[list[dict], list[dict]]:
    """Hand-built cases: their per-case rows (raw = final) and lesion detection results."""
    rows, lesions = [], []
    for name in names:
        t, p = (line(v) for v in CASES[name])
        rows.append({"case": name, **uh._score_with_raw(p, p, t, (1.0, 1.0, 1.0))})
        lesions.append(uh.lesion_detection(p, t, (1.0, 1.0, 1.0)))
    return rows, lesions


def test_summarize_by_hand():
    rows, lesions = _summary_cases()
    s = uh.summarize(rows, lesions)
    # per case dice_liver: perfect 1, fp_tumor 6/7 (T 4, P 3), empty_pred 0, over 1 -> (20/7)/4
    assert s["dice_liver"] == pytest.approx(5 / 7)
    # dice_tumor over cases with tumour: perfect 1, empty_pred 0, over 2*1/(1+3) = 0.5 -> 0.5
    assert s["dice_tumor"] == pytest.approx(0.5)
    # all cases (nnU-Net and LiTS agree: no empty/empty case here): 1, 0 (FP on tumour-free), 0, 0.5 -> 1.5/4
    assert s["dice_tumor_all_cases"] == pytest.approx(0.375) and s["dice_tumor_lits"] == pytest.approx(0.375)
    # LiTS liver: 1, 2*4/(4+5) = 8/9, 0, 2*4/(4+6) = 0.8 -> (121/45)/4
    assert s["dice_liver_lits"] == pytest.approx(121 / 180)
    # dice_mean over cases with tumour: perfect 1, empty_pred 0, over (1 + 0.5)/2 = 0.75 -> 1.75/3
    assert s["dice_mean"] == pytest.approx(7 / 12)
    # HD95 (LiTS liver): perfect 0; fp_tumor pct [0,0,0,0,1] pos 3.8 -> 0.8;
    # over pct [0,0,0,0,1,2] pos 4.75 -> 1.75; empty_pred undefined -> (0 + 0.8 + 1.75)/3
    assert s["hd95_liver_lits_mm"] == pytest.approx(0.85)
    assert s["n_hd95_liver_lits_mm_undefined"] == 1
    # tumour volume ratios on cases with tumour: 1, 0, 3 -> median 1 (mean would be 4/3); RVD 0, -1, 2 -> 1/3
    assert s["median_tumor_volume_ratio"] == pytest.approx(1.0) and s["tumor_rvd"] == pytest.approx(1 / 3)
    # liver (label 1) counts summed: tp 4+3+0+3, fp 0+0+0+0, fn 0+1+2+0 -> 20 / 23
    assert s["dice_liver_global"] == pytest.approx(20 / 23)
    # tumour: tp 2+0+0+1, fp 0+2+0+2, fn 0+0+2+0 -> 6 / 12
    assert s["dice_tumor_global"] == pytest.approx(0.5)
    # lesions: 3 reference, 1 detected (perfect; over's IoU is 1/3), 2 touched; 3 predicted, 1 detected, 2 touching
    assert (s["lesion_recall"], s["lesion_precision"], s["lesion_f1"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert s["lesion_recall_any_overlap"] == pytest.approx(2 / 3) and s["lesion_dice"] == 1.0
    # tumour burden (label 2 / label >= 1), predicted - true: 0; 2/5 - 0; 0 - 2/4; 3/6 - 1/4
    # -> RMSE sqrt((0 + 0.16 + 0.25 + 0.0625) / 4), largest error 0.5
    assert s["tumor_burden_rmse"] == pytest.approx(math.sqrt(0.4725 / 4))
    assert s["tumor_burden_max_error"] == pytest.approx(0.5)
    per_case_values = {"dice_liver": [1, 6 / 7, 0, 1], "dice_tumor": [1, 0, 0.5],
                       "dice_tumor_all_cases": [1, 0, 0, 0.5], "dice_liver_lits": [1, 8 / 9, 0, 0.8],
                       "dice_mean": [1, 0, 0.75]}
    for key, values in per_case_values.items():
        lo, hi = s["ci95"][key]
        assert min(values) - 1e-9 <= lo <= s[key] <= hi <= max(values) + 1e-9, key
        assert lo < hi, key


def test_dice_tumor_lits_counts_every_case_as_the_lits_evaluation_does():
    """Four cases: LiTS's rule (every case; no tumour anywhere = 1, false tumour on a tumour-free case = 0), the
    mean over cases with tumour, and nnU-Net's (empty/empty left out) give three different means."""
    cases = {"half": ([1, 2, 2, 0], [1, 1, 2, 2]),  # tumour Dice 2*1 / (2+2)
             "clean": ([1, 1, 0, 0], [1, 1, 0, 0]),  # no tumour, none predicted
             "false_tumour": ([1, 1, 0, 0], [1, 2, 0, 0]),
             "missed": ([1, 2, 0, 0], [1, 1, 0, 0])}
    rows = [uh._score_with_raw(line(p), line(p), line(t), (1.0, 1.0, 1.0)) for t, p in cases.values()]
    assert [r["dice_tumor_lits"] for r in rows] == [0.5, 1.0, 0.0, 0.0]
    s = uh.summarize(rows)
    assert s["dice_tumor_lits"] == pytest.approx(1.5 / 4)
    assert s["dice_tumor"] == pytest.approx(0.5 / 2)  # half, missed
    assert s["dice_tumor_all_cases"] == pytest.approx(0.5 / 3)  # half, false_tumour, missed
    # burden errors (predicted - true): 2/4 - 2/3, 0, 1/2 - 0, 0 - 1/2 -> RMSE sqrt((1/36 + 0 + 1/4 + 1/4) / 4)
    assert s["tumor_burden_rmse"] == pytest.approx(math.sqrt(19) / 12)
    assert s["tumor_burden_max_error"] == pytest.approx(0.5)
    assert s["tumor_rvd"] == pytest.approx(-0.5)  # half 0, missed -1; no tumour: undefined


def test_summarize_without_lesions_pools_the_lesion_counts():
    rows, lesions = _summary_cases()
    s = uh.summarize(rows)
    assert s["dice_tumor"] == pytest.approx(0.5)
    assert s["n_hd95_liver_lits_mm_undefined"] == 1
    assert set(s["ci95"]) >= {"dice_liver", "dice_tumor", "dice_tumor_all_cases", "dice_liver_lits", "dice_mean"}
    with_lists = uh.summarize(rows, lesions)
    for key in ("lesion_recall", "lesion_precision", "lesion_f1", "lesion_recall_any_overlap", "lesion_dice"):
        assert s[key] == with_lists[key], key
    assert "lesion_recall_by_volume" not in s  # needs the lesion lists


# ---------------------------------------------------------------- postprocess
def test_postprocess_empty_and_single_component_unchanged():
    empty = np.zeros((5, 5, 3), np.uint8)
    np.testing.assert_array_equal(uh.postprocess(empty), empty)
    one = np.zeros((8, 8, 4), np.uint8)
    one[1:6, 1:6, 0:3] = 1
    one[2:4, 2:4, 1] = 2  # tumour inside the liver
    one[5, 1:3, 3] = 2  # tumour on the liver's face (x = 5, z = 3 touches z = 2)
    before = one.copy()
    out = uh.postprocess(one)
    np.testing.assert_array_equal(out, before)
    np.testing.assert_array_equal(one, before)  # input not modified
    assert out.dtype == np.uint8


def test_postprocess_removes_islands():
    pred = np.zeros((10, 10, 4), np.uint8)
    pred[0:4, 0:4, 0:2] = 1  # liver: 32 voxels
    pred[1, 1, 1] = 2  # tumour inside: stays tumour
    pred[4, 0:2, 0] = 2  # tumour attached to the liver: stays tumour
    expected = pred.copy()
    pred[8, 8, 3] = 1  # stray liver island
    pred[6:8, 6:8, 0] = 2  # tumour island separated from the liver (x 6..7 vs liver up to x 4)
    out = uh.postprocess(pred)
    np.testing.assert_array_equal(out, expected)


def test_postprocess_largest_counts_tumour_voxels():
    pred = np.zeros((12, 4, 4), np.uint8)
    pred[0:5, 0, 0] = 1  # liver only: 5 voxels
    pred[7:10, 0, 0] = 1  # liver 3 + tumour 3 = 6 voxels: the largest foreground component
    pred[7:10, 1, 0] = 2
    expected = np.zeros_like(pred)
    expected[7:10, 0, 0] = 1
    expected[7:10, 1, 0] = 2
    np.testing.assert_array_equal(uh.postprocess(pred), expected)


def test_postprocess_diagonal_contact_is_one_component():
    pred = np.zeros((9, 9, 5), np.uint8)
    pred[0:2, 0:2, 0:2] = 1  # 8 voxels
    pred[2:4, 2:4, 2:4] = 1  # 8 voxels, touching the first only at the corner (1,1,1)-(2,2,2)
    expected = pred.copy()
    pred[8, 0, 0] = 1  # a far island, removed
    np.testing.assert_array_equal(uh.postprocess(pred), expected)


def test_postprocess_tumour_only_prediction():
    pred = np.zeros((8, 8, 3), np.uint8)
    pred[0:2, 0:2, 0] = 2  # 4 tumour voxels
    pred[6, 6, 2] = 2  # 1 voxel
    expected = np.zeros_like(pred)
    expected[0:2, 0:2, 0] = 2
    np.testing.assert_array_equal(uh.postprocess(pred), expected)


def test_postprocess_prefers_the_component_with_liver():
    p = np.zeros((12, 4, 4), np.uint8)
    p[0:2, 0, 0] = 1  # 2 liver voxels
    p[5:11, 0, 0] = 2  # a separate, larger (6 voxels) tumour-only component
    q = uh.postprocess(p)
    np.testing.assert_array_equal(q[0:2, 0, 0], [1, 1])  # the liver is kept ...
    assert (q == 2).sum() == 0  # ... and the detached tumour dropped


# ---------------------------------------------------------------- split_cases
def _check_partition(ids: Sequence[str], tr: list, va: list) -> None:
    assert set(tr).isdisjoint(va)
    assert sorted(tr + va) == sorted(ids)
    assert tr == sorted(tr, key=natural)
    assert va == sorted(va, key=natural)


def test_split_natural_order_and_determinism():
    ids = [f"c{i}" for i in np.random.default_rng(0).permutation(np.arange(1, 31))]  # shuffled c1..c30
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # 30 * 0.2 = 6 validation cases: no warning
        tr, va = uh.split_cases(ids, 0.2, seed=1)
    _check_partition(ids, tr, va)
    assert len(va) == 6
    assert uh.split_cases(ids, 0.2, seed=1) == (tr, va)
    assert uh.split_cases(ids, 0.2, seed=2) != (tr, va)


def test_split_warns_on_small_validation():
    ids = [f"c{i}" for i in range(1, 11)]
    with pytest.warns(UserWarning):
        tr, va = uh.split_cases(ids, 0.2, seed=0)  # 10 * 0.2 = 2 < 5
    _check_partition(ids, tr, va)


def test_split_stratified_by_tumour():
    ids = [f"c{i}" for i in range(1, 21)]
    free = {"c3", "c8", "c15", "c20"}
    has_tumor = {c: c not in free for c in ids}
    for seed in range(8):
        with pytest.warns(UserWarning):  # 4 validation cases
            tr, va = uh.split_cases(ids[::-1], 0.2, seed=seed, has_tumor=has_tumor)
        _check_partition(ids, tr, va)
        # 20 * 0.2 = 4: tumour-free 4 * 0.2 = 0.8 -> 1, tumour 16 * 0.2 = 3.2 -> 3
        assert len(va) == 4, seed
        assert len(free & set(va)) == 1, seed
    with pytest.raises(TypeError, match="as dicts"):  # a list aligned with the ids is refused, not misread
        uh.split_cases(ids, 0.2, has_tumor=[has_tumor[c] for c in ids])


def test_split_rare_tumour_always_in_validation():
    ids = [f"c{i}" for i in range(1, 11)]
    has_tumor = {c: c in ("c4", "c9") for c in ids}
    for seed in range(20):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tr, va = uh.split_cases(ids, 0.2, seed=seed, has_tumor=has_tumor)
        _check_partition(ids, tr, va)
        assert {"c4", "c9"} & set(va), seed
        assert {"c4", "c9"} - set(va), seed  # and one left to train on


def test_split_groups_keep_patients_together():
    ids = [f"c{i}" for i in range(1, 13)]
    patient = {c: f"p{(i - 1) // 2}" for i, c in enumerate(ids, 1)}  # c1,c2 -> p0; c3,c4 -> p1; ...
    for seed in range(6):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tr, va = uh.split_cases(ids[::-1], 0.3, seed=seed, groups=patient)
        _check_partition(ids, tr, va)
        assert tr and va
        assert not {patient[c] for c in tr} & {patient[c] for c in va}, seed


@pytest.mark.parametrize("n_free,allowed", [(5, {1}), (7, {1, 2})])
def test_split_folds_partition_balanced_and_stratified(n_free: int, allowed: set):
    ids = [f"case_{i}" for i in range(23)]
    free = set(ids[::3][:n_free])
    has_tumor = {c: c not in free for c in ids}
    seen: list[str] = []
    sizes = []
    for fold in range(5):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tr, va = uh.split_cases(ids, seed=4, has_tumor=has_tumor, fold=fold)
        _check_partition(ids, tr, va)
        seen += va
        sizes.append(len(va))
        # 5 tumour-free over 5 folds -> 1 each; 7 -> 1 or 2 each
        assert len(free & set(va)) in allowed, fold
    assert sorted(seen) == sorted(ids)  # each case validated exactly once
    assert sorted(sizes) == [4, 4, 5, 5, 5]  # 23 = 5+5+5+4+4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert uh.split_cases(ids, seed=4, has_tumor=has_tumor, fold=2) == \
            uh.split_cases(ids, seed=4, has_tumor=has_tumor, fold=2)


def test_split_folds_with_groups():
    ids = [f"c{i}" for i in range(1, 13)]
    patient = {c: f"p{(i - 1) // 2}" for i, c in enumerate(ids, 1)}
    seen: list[str] = []
    sizes = []
    for fold in range(5):  # 6 patients in 5 folds: one fold holds 2 patients (4 cases), the others 1 (2 cases)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tr, va = uh.split_cases(ids, seed=0, groups=patient, fold=fold)
        _check_partition(ids, tr, va)
        assert va
        assert not {patient[c] for c in tr} & {patient[c] for c in va}, fold
        seen += va
        sizes.append(len(va))
    assert sorted(seen) == sorted(ids) and sorted(sizes) == [2, 2, 2, 2, 4]


# ---------------------------------------------------------------- gather_folds
def test_gather_folds_pools_cases_and_keeps_the_spread_over_folds(tmp_path: Path):
    summaries = [
        {"dice_liver": 0.9, "hd95": 10.0, "n_cases": 4, "maybe": None, "name": "a", "ci95": {"dice_liver": [0, 1]}},
        {"dice_liver": 0.8, "hd95": 14.0, "n_cases": 5, "maybe": 0.5},
        {"dice_liver": 0.7, "hd95": None, "n_cases": 4, "maybe": None},
    ]
    folds = [("perfect", "fp_tumor"), ("empty_pred",), ("over",)]  # the four cases of _summary_cases, split
    paths = []
    for i, (summary, names) in enumerate(zip(summaries, folds)):
        folder = tmp_path / f"fold{i}"
        folder.mkdir()
        body = {"config": {"FOLD": i, "SEED": 0}, "summary": summary, "per_case": _summary_cases(names)[0]}
        (folder / "metrics.json").write_text(json.dumps(uh.json_safe(body)))  # NaN written as null, as metrics.json
        paths.append(folder / "metrics.json" if i == 1 else folder)  # a file or its folder
    g = uh.gather_folds(paths)
    pooled, by_fold = g["pooled"], g["by_fold"]
    # pooled over the four cases, as in test_summarize_by_hand: not the mean of the folds' values
    assert pooled["n_cases"] == 4 and pooled["dice_tumor"] == pytest.approx(0.5)  # fold means: 1, 0, 0.5
    assert pooled["dice_tumor_global"] == pytest.approx(0.5)  # summed counts: 6 / 12
    assert pooled["dice_liver_global"] == pytest.approx(20 / 23)
    assert (pooled["lesion_recall"], pooled["lesion_precision"]) == pytest.approx((1 / 3, 1 / 3))
    assert pooled["dice_tumor_lits"] == pytest.approx(0.375)
    assert by_fold["dice_liver"]["mean"] == pytest.approx(0.8)
    assert by_fold["dice_liver"]["std"] == pytest.approx(0.1)  # sqrt((0.01 + 0 + 0.01) / 2)
    assert by_fold["dice_liver"]["n"] == 3
    assert by_fold["hd95"]["mean"] == pytest.approx(12.0)  # null skipped
    assert by_fold["hd95"]["std"] == pytest.approx(math.sqrt(8))  # sqrt((4 + 4) / 1)
    assert by_fold["hd95"]["n"] == 2
    assert by_fold["n_cases"]["mean"] == pytest.approx(13 / 3)
    assert by_fold["n_cases"]["std"] == pytest.approx(math.sqrt(1 / 3))  # (1/9 + 4/9 + 1/9) / 2
    assert by_fold["maybe"]["mean"] == pytest.approx(0.5)
    assert isnan(by_fold["maybe"]["std"])  # a single value
    assert by_fold["maybe"]["n"] == 1
    assert "name" not in by_fold and "ci95" not in by_fold
    other = tmp_path / "other_seed"
    other.mkdir()
    (other / "metrics.json").write_text(json.dumps({"config": {"FOLD": 3, "SEED": 1}, "summary": summaries[0]}))
    with pytest.raises(ValueError, match="different settings \\(SEED\\)"):
        uh.gather_folds([*paths, other])  # a fold of another configuration does not belong in the table
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.json").write_text(json.dumps({"config": {"FOLD": 4, "SEED": 0}, "summary": summaries[0],
                                                  "per_case": [{"dice_liver": 0.9}]}))
    with pytest.raises(ValueError, match="no per-case overlap counts"):
        uh.gather_folds([*paths, old])


def test_check_fold_and_run_dir(tmp_path: Path):
    assert uh.run_dir(tmp_path) == tmp_path
    assert uh.run_dir(tmp_path, 3) == tmp_path / "fold_3"
    for bad in (5, -1, 1.0, True, "0"):
        with pytest.raises(ValueError, match="FOLD must be None or an integer 0-4"):
            uh.run_dir(tmp_path, bad)


# ---------------------------------------------------------------- save_prediction
def test_save_prediction_back_to_lps_grid(tmp_path: Path):
    nx, ny, nz = 5, 4, 3
    file_img = (np.arange(nx * ny * nz).reshape(nx, ny, nz) * 20 - 1000).astype(np.int16)  # -1000 .. 180 HU
    affine = np.diag([-1.5, -1.5, 2.0, 1.0])  # LPS
    image_path = write_nifti(tmp_path / "in" / "img.nii.gz", file_img, affine)
    case = uh.load_case(image_path)
    # LPS -> RAS flips x and y: canonical (i, j, k) == file (nx-1-i, ny-1-j, k)
    assert case.image.shape == (nx, ny, nz)
    assert case.image[0, 1, 2] == file_img[nx - 1, ny - 2, 2]
    label = (case.image > 0).astype(np.uint8)  # liver where HU > 0, found in canonical space
    label[0, 1, 2] = 2  # one tumour voxel placed in canonical space
    out_path = tmp_path / "out" / "img_pred.nii.gz"
    out_path.parent.mkdir()
    returned = uh.save_prediction(label, image_path, out_path)
    assert Path(returned) == out_path
    saved = nib.load(str(out_path))
    data = np.asarray(saved.dataobj)
    assert data.shape == (nx, ny, nz)
    assert data.dtype == np.uint8
    np.testing.assert_allclose(saved.affine, affine, atol=1e-6)
    assert data[nx - 1 - 0, ny - 1 - 1, 2] == 2  # canonical (0, 1, 2) -> file (4, 2, 2)
    assert (data == 2).sum() == 1
    expected = (file_img > 0).astype(np.uint8)  # the label mapped back is thresholding the file itself
    expected[4, 2, 2] = 2
    np.testing.assert_array_equal(data, expected)
    np.testing.assert_array_equal(data, label[::-1, ::-1, :])
    assert sorted(p.name for p in out_path.parent.iterdir()) == ["img_pred.nii.gz"]  # no temp file left


def test_postprocess_drops_tumour_specks_under_the_floor():
    pred = np.zeros((10, 10, 4), np.uint8)
    pred[0:8, 0:8, 0:4] = 1  # liver: one component
    pred[1, 1, 1] = pred[2, 2, 2] = 2  # one tumour component (corner contact, 26-connected): 2 voxels
    pred[5:7, 5:7, 1] = 2  # 4 voxels
    pred[7, 0, 3] = 2  # 1 voxel
    pred[9, 9, 0] = 1  # a liver island: removed as before
    spacing = (1.0, 1.0, 100.0)  # 0.1 mL a voxel: tumour of 0.2, 0.4 and 0.1 mL
    expected = pred.copy()
    expected[9, 9, 0] = 0
    np.testing.assert_array_equal(uh.postprocess(pred, spacing), expected)  # no floor: the largest component only
    expected[1, 1, 1] = expected[2, 2, 2] = expected[7, 0, 3] = 1  # under 0.3 mL: liver
    np.testing.assert_array_equal(uh.postprocess(pred, spacing, min_tumor_ml=0.3), expected)
    expected[1, 1, 1] = expected[2, 2, 2] = 2  # 0.2 mL is not under 0.15, nor under 0.2: kept
    np.testing.assert_array_equal(uh.postprocess(pred, spacing, min_tumor_ml=0.15), expected)
    np.testing.assert_array_equal(uh.postprocess(pred, spacing, min_tumor_ml=0.2), expected)
    only = np.zeros_like(pred)
    only[0, 0, 0] = 2  # a prediction of one tumour voxel and no liver: the speck becomes background
    np.testing.assert_array_equal(uh.postprocess(only, spacing, min_tumor_ml=0.15), np.zeros_like(pred))
    with pytest.raises(ValueError, match="spacing"):
        uh.postprocess(pred, min_tumor_ml=0.1)
    assert uh.drop_small_tumor(pred, spacing, 0.0) is pred
