"""Inference time for one 256×256×200 volume: batched slices vs one slice at a time (same process).

    python bench/bench_infer.py [--repeats 3] [--full]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import md_table, median_time, stamp, write_table

import unet_helpers as uh


def run(shape=(256, 256, 200), repeats: int = 3, presets=("quick",), write: bool = True,
        command: str = "python bench/bench_infer.py") -> dict:
    """Seconds per volume for each preset's U-Net, batched (32 slices) vs unbatched (1 slice)."""
    rng = np.random.default_rng(0)
    volume = rng.random(shape, dtype=np.float32)
    res, rows = {}, []
    for preset in presets:
        p = uh.PRESETS[preset]
        torch.manual_seed(0)
        model = uh.UNet(3, 3, p["BASE_CHANNELS"], p["DEPTH"]).to(memory_format=torch.channels_last).eval()
        slices = uh.resize_volume_slices(volume, p["IMAGE_SIZE"])
        batched, _ = median_time(lambda m=model, x=slices: uh.predict_slices(m, x, shape[:2], 3, "cpu", 32), repeats, 1)
        single, _ = median_time(lambda m=model, x=slices: uh.predict_slices(m, x, shape[:2], 3, "cpu", 1), repeats, 0)
        res[preset] = {"batched_s": batched, "single_s": single}
        rows.append([f"{preset} ({p['IMAGE_SIZE']}², base {p['BASE_CHANNELS']}, depth {p['DEPTH']})", "cpu",
                     f"{single:.2f}", f"{batched:.2f}", f"{single / batched:.2f}×"])
    if write:
        write_table("infer", stamp(command) + f"\n\nOne {'×'.join(map(str, shape))} volume, 3-slice context, logits "
                    f"resized to 256² before argmax; median of {repeats}.\n\n"
                    + md_table(["U-Net", "device", "1 slice/batch (s)", "32 slices/batch (s)", "speed-up"], rows))
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="also the full preset's U-Net (slow on CPU)")
    a = ap.parse_args()
    presets = ("quick", "full") if a.full else ("quick",)
    print(run(repeats=a.repeats, presets=presets,
              command=f"python bench/bench_infer.py --repeats {a.repeats}{' --full' if a.full else ''}"))
