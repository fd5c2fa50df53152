"""Mutation check: plant deliberate bugs in a copy of unet_helpers.py and make sure the tests catch each.

A bug that the suite does not catch is a missing test. Each mutation is one exact text replacement in a
copy of the module (the original is never touched); the unit tests (the notebook tests excluded, for
time) then run against the copy and must fail. The unmutated copy must pass first.

    python tools/mutation_check.py            # exit 0 when every mutation is caught (a few minutes)
    python tools/mutation_check.py --list     # the mutations

Run by .ci/run after the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# test_core.py first: it is fast and catches most of the core mutations, and pytest -x stops at the first failure
TESTS = ["tests/test_core.py", "tests/test_data.py", "tests/test_evaluation.py", "tests/test_model.py",
         "tests/test_hand_computed.py"]

# name: (exact text in unet_helpers.py, its mutated replacement)
MUTATIONS: dict[str, tuple[str, str]] = {
    "Dice numerator (tp instead of 2 tp)": (
        "return float(2 * tp / denom) if denom else empty",
        "return float(tp / denom) if denom else empty"),
    "swapped label index (tumour scored as label 1)": (
        '"tumor": lambda p, t: (p == 2, t == 2),',
        '"tumor": lambda p, t: (p == 1, t == 2),'),
    "LiTS's per-case tumour Dice scores a case without any tumour 0": (
        'dice_tumor_lits=dice_from_counts(*counts["tumor"], empty=1.0),',
        'dice_tumor_lits=dice_from_counts(*counts["tumor"], empty=0.0),'),
    "tumour burden divides by the liver without its tumour": (
        "    liver = int((labels >= 1).sum())",
        "    liver = int((labels == 1).sum())"),
    "dropped orientation flip (no reorientation to RAS)": (
        "    view = apply_orientation(data, ornt)  # a flipped/transposed view",
        "    view = data  # a flipped/transposed view"),
    "HU window bound (upper bound used as the offset)": (
        "    out -= lo\n",
        "    out -= hi\n"),
    "train/validation leak (validation cases also in training)": (
        "    return [i for i in ids if patient[i] not in val_units], val",
        "    return list(ids), val"),
    "post-processing keeps every component": (
        "        fg = lab == sizes.argmax()",
        "        fg = lab > 0"),
    "a lesion touched by one voxel counts as detected (no IoU rule)": (
        "        detected = iou > iou_threshold  # LiTS: more than half",
        "        detected = iou > 0  # LiTS: more than half"),
    "lesions covered by one prediction are not merged": (
        "            refs.setdefault(int(owner[g]), []).append(g)",
        "            refs.setdefault(n_pred + g, []).append(g)"),
    "cross-validation keeps only the last fold's cases": (
        '        rows += body["per_case"]',
        '        rows = body["per_case"]'),
    "multi-GPU processes step one shared copy of the weights": (
        '        model = copy.deepcopy(job["model"])',
        '        model = job["model"]'),
    "multi-GPU processes each train on the whole batch": (
        "    return [idx[rank::world] for idx in batches] if world > 1 else batches",
        "    return batches"),
    "contrast-balanced sampling draws tumour slices uniformly": (
        "        if self.tumor_by_group is None:\n",
        "        if True:\n"),
    "training windows never centred on tumour": (
        "    centre = torch.where((u[2] < 0.5) & (count > 0), kth, anywhere)",
        "    centre = anywhere"),
    "the augmentation's window of the labels is not the image's": (
        "        grid, y = take_windows(grid, top, left, window), take_windows(y, top, left, window)",
        "        grid, y = take_windows(grid, top, left, window), take_windows(y, left, top, window)"),
    "the cascade's split ignores the recipe's stage-1 share": (
        "    first = max(1, int(round(epochs * stage1_share)))",
        "    first = max(1, int(round(epochs * CASCADE_STAGE1_SHARE)))"),
    "lesion contrast measured against every voxel, not the liver": (
        "    liver = float(np.median(case.image[label == 1].astype(np.float32))) * (hi - lo)",
        "    liver = float(np.median(case.image[label >= 0].astype(np.float32))) * (hi - lo)"),
    "the cascade's stage-1 core overwrites stage 2's tumour": (
        "    out[liver_core(stage1_liver, spacing, depth_mm) & (out == 0)] = 1",
        "    out[liver_core(stage1_liver, spacing, depth_mm)] = 1"),
    "the liver core ignores the pixel spacing": (
        "ndimage.distance_transform_edt(inside, sampling=spacing[:2]) > depth_mm",
        "ndimage.distance_transform_edt(inside) > depth_mm"),
    "the liver core counts the image border as liver": (
        "        inside = np.pad(liver[:, :, z], 1)",
        "        inside = np.pad(liver[:, :, z], 1, mode=\"edge\")"),
    # the core: loss, U-Net, inference, schedule, 2.5D input, lesion matching, HU window, the two stages' average
    "the soft Dice's smoothing left out of its denominator": (
        "dice_loss = 1 - ((tp + self.smooth) / (tp + 0.5 * fp + 0.5 * fn + self.smooth)).mean()",
        "dice_loss = 1 - ((tp + self.smooth) / (tp + 0.5 * fp + 0.5 * fn)).mean()"),
    "the soft Dice counts false calls as misses": (
        "return (probs * onehot).sum(dims), (probs * (1 - onehot)).sum(dims), ((1 - probs) * onehot).sum(dims)",
        "return (probs * onehot).sum(dims), ((1 - probs) * onehot).sum(dims), ((1 - probs) * onehot).sum(dims)"),
    "the per-slice Dice pools over the batch": (
        "dims = (0, 2, 3) if self.batch_dice else (2, 3)",
        "dims = (0, 2, 3)"),
    "the U-Net's skip connection carries zeros": (
        "return self.conv(torch.cat([skip, x], dim=1))",
        "return self.conv(torch.cat([torch.zeros_like(skip), x], dim=1))"),
    "inference resizes the logits by nearest neighbour": (
        'logits = F.interpolate(logits.float(), size=out_shape, mode="bilinear", align_corners=False)',
        'logits = F.interpolate(logits.float(), size=out_shape, mode="nearest")'),
    "inference resizes the softmax, not the logits": (
        'logits = F.interpolate(logits.float(), size=out_shape, mode="bilinear", align_corners=False)\n'
        "        yield start, torch.softmax(logits, 1)",
        "probs = torch.softmax(logits.float(), 1)\n"
        '        yield start, F.interpolate(probs, size=out_shape, mode="bilinear", align_corners=False)'),
    "no learning-rate warm-up": (
        "            return (step + 1) / warm\n",
        "            return 1.0\n"),
    "the cosine schedule stops short of 0": (
        "max(1, total - warm)",
        "max(1, total)"),
    "2.5D neighbours wrap around the volume's ends": (
        "    return np.clip(idx, 0, n_slices - 1)\n",
        "    return idx % n_slices\n"),
    "lesion IoU divides by both sizes (the union counts the overlap twice)": (
        "        iou = common / (sizes - common)\n",
        "        iou = common / sizes\n"),
    "a lesion overlapped by exactly half counts as detected": (
        "        detected = iou > iou_threshold  # LiTS: more than half",
        "        detected = iou >= iou_threshold  # LiTS: more than half"),
    "inference windows with the default HU window, not its own": (
        "    windowed = window_hu(case.image, hu_window)\n",
        "    windowed = window_hu(case.image)\n"),
    "the cascade's liver average ignores stage 1": (
        "foreground = (1 - stage2_probs[:, 0] + stage1_fg) / 2 >= 0.5",
        "foreground = (1 - stage2_probs[:, 0]) >= 0.5"),
    "the cascade's stage-1 floor of steps ignored": (
        "    need = math.ceil(min_stage1_steps / steps_per_epoch)\n",
        "    need = 0\n"),
    "the recipe's stage 2 not mirrored": (
        "mirror=0.5 if stage2 and rec.get(\"stage2_mirror\") else 0.0)",
        "mirror=0.0)"),
    "train ignores the step it is given": (
        "    step_fn = step or train_step\n",
        "    step_fn = train_step\n"),
    "the cascade's liver average needs more than half": (
        "foreground = (1 - stage2_probs[:, 0] + stage1_fg) / 2 >= 0.5",
        "foreground = (1 - stage2_probs[:, 0] + stage1_fg) / 2 > 0.5"),
}


def run_tests(module: Path, workdir: Path) -> tuple[bool, float]:
    """Run the unit tests with ``module`` as unet_helpers; (passed, seconds)."""
    shutil.copy(module, workdir / "unet_helpers.py")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    real_ct = ROOT.parent / "shared" / "data" / "real_ct"  # the copy lives elsewhere: point its tests at ../shared
    if real_ct.exists():
        env.setdefault("LIVER_REAL_CT_DIR", str(real_ct))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS],
                          cwd=workdir, env=env, capture_output=True, text=True)
    return proc.returncode == 0, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    if a.list:
        print("\n".join(MUTATIONS))
        return 0
    source = (ROOT / "unet_helpers.py").read_text()
    missing = [name for name, (old, _new) in MUTATIONS.items() if source.count(old) != 1]
    if missing:  # the code moved on: a mutation that no longer applies checks nothing
        print("mutations whose text is not found exactly once in unet_helpers.py:", *missing, sep="\n  ")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
        original = work / "original.py"
        original.write_text(source)
        ok, secs = run_tests(original, work)
        print(f"unmutated: {'passes' if ok else 'FAILS'} ({secs:.0f} s)", flush=True)
        if not ok:
            return 2
        survivors = []
        for name, (old, new) in MUTATIONS.items():
            mutant = work / "mutant.py"
            mutant.write_text(source.replace(old, new))
            passed, secs = run_tests(mutant, work)
            print(f"{'SURVIVED' if passed else 'caught  '}  {name} ({secs:.0f} s)", flush=True)
            if passed:
                survivors.append(name)
    print(f"{len(MUTATIONS) - len(survivors)} of {len(MUTATIONS)} mutations caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
