"""Preprocessing speed: our cached, parallel path vs a naive float64 per-slice loop (same process).

    python bench/bench_preprocess.py [--n 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from common import WORK, md_table, median_time, stamp, write_table
from scipy import ndimage

import unet_helpers as uh


def naive_preprocess(cases, out_dir: Path, image_size: int, window=(-100, 400)) -> None:
    """What many public notebooks do: get_fdata() as float64, then resize slice by slice in Python."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for c in cases:
        img = nib.load(str(c.image)).get_fdata()  # float64 copy of the whole volume
        lab = nib.load(str(c.label)).get_fdata()
        img = (np.clip(img, *window) - window[0]) / (window[1] - window[0])
        zx, zy = image_size / img.shape[0], image_size / img.shape[1]
        slices = [ndimage.zoom(img[:, :, z], (zx, zy), order=1) for z in range(img.shape[2])]
        labels = [ndimage.zoom(lab[:, :, z], (zx, zy), order=0) for z in range(lab.shape[2])]
        np.save(out_dir / f"{c.case_id}_img.npy", np.stack(slices).astype(np.float32))
        np.save(out_dir / f"{c.case_id}_lab.npy", np.stack(labels).astype(np.uint8))


def run(n: int = 10, shape=(512, 512, 100), image_size: int = 256, repeats: int = 3, write: bool = True,
        command: str = "python bench/bench_preprocess.py") -> dict:
    """Time both paths on ``n`` synthetic volumes; return (and optionally write) the table's numbers."""
    data = WORK / f"preprocess_{n}x{'x'.join(map(str, shape))}"
    uh.make_synthetic_dataset(data, n_cases=n, shape=tuple(shape), seed=7, progress=False)
    cases = uh.find_cases(data)
    mb = sum(np.prod(nib.load(str(c.image)).shape) * 2 for c in cases) / 2**20  # int16 voxels
    tmp = Path(tempfile.mkdtemp(prefix="bench_pre_"))
    try:
        runs = iter(range(10**6))
        naive_t, _ = median_time(lambda: naive_preprocess(cases, tmp / f"naive{next(runs)}", image_size), repeats)
        ours_t, _ = median_time(lambda: uh.preprocess_dataset(cases, tmp / f"ours{next(runs)}", image_size,
                                                              progress=False), repeats)
        uh.preprocess_dataset(cases, tmp / "warm", image_size, progress=False)
        cached_t, _ = median_time(lambda: uh.preprocess_dataset(cases, tmp / "warm", image_size, progress=False),
                                  repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {"n": n, "shape": list(shape), "image_size": image_size, "naive_s": naive_t, "ours_s": ours_t,
           "cached_s": cached_t, "speedup": naive_t / ours_t, "cached_share": cached_t / ours_t, "mb": mb}
    if write:
        rows = [["naive (get_fdata float64 + per-slice scipy zoom)", f"{naive_t:.2f}", f"{n / naive_t:.2f}",
                 f"{mb / naive_t:.0f}", "1.00×"],
                ["ours, first run (ISA-L gzip, one-pass reorient + float32 cast, area resize, 2 processes)",
                 f"{ours_t:.2f}",
                 f"{n / ours_t:.2f}", f"{mb / ours_t:.0f}", f"**{naive_t / ours_t:.2f}×**"],
                ["ours, cached rerun", f"{cached_t:.3f}", f"{n / cached_t:.0f}", "-",
                 f"{cached_t / ours_t:.1%} of first run"]]
        write_table("preprocess", stamp(command) + f"\n\n{n} synthetic volumes of {'×'.join(map(str, shape))} "
                    f"(int16, .nii.gz) → {image_size}² slices; median of {repeats} runs.\n\n"
                    + md_table(["path", "seconds", "volumes/s", "MB/s", "vs naive"], rows))
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    print(run(a.n, repeats=a.repeats, command=f"python bench/bench_preprocess.py --n {a.n} --repeats {a.repeats}"))
