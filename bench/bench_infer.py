"""Inference time for one 256×256×200 volume at several batch sizes (slices per forward pass; same process).

    python bench/bench_infer.py [--repeats 3] [--full]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from common import md_table, median_time, stamp, write_table

import unet_helpers as uh


def run(shape=(256, 256, 200), repeats: int = 3, presets=("quick",), batches=(1, 4, 8, 32), write: bool = True,
        command: str = "python bench/bench_infer.py") -> dict:
    """Seconds per volume for each preset's U-Net at each batch size (slices per forward pass)."""
    rng = np.random.default_rng(0)
    volume = rng.random(shape, dtype=np.float32)
    res, rows = {}, []
    for preset in presets:
        p = uh.PRESETS[preset]
        torch.manual_seed(0)
        model = uh.UNet(3, 3, p["BASE_CHANNELS"], p["DEPTH"]).to(memory_format=torch.channels_last).eval()
        slices = uh.resize_volume_slices(volume, p["IMAGE_SIZE"])
        uh.predict_slices(model, slices[:8], shape[:2], 3, "cpu", 8)  # warm-up
        times = {b: [] for b in batches}
        for _ in range(repeats):  # interleaved, so a slow spell of the machine hits every batch size alike
            for b in batches:
                times[b] += median_time(lambda m=model, x=slices, b=b: uh.predict_slices(m, x, shape[:2], 3, "cpu", b),
                                        1)[1]
        secs = {b: statistics.median(t) for b, t in times.items()}
        res[preset] = {f"batch_{b}_s": t for b, t in secs.items()}
        best, auto = min(secs, key=secs.get), uh.inference_batch_size("cpu", p["IMAGE_SIZE"])
        rows.append([f"{preset} ({p['IMAGE_SIZE']}², base {p['BASE_CHANNELS']}, depth {p['DEPTH']})", "cpu"]
                    + [f"{secs[b]:.2f}" + (" (auto)" if b == auto else "") for b in batches]
                    + [f"{best} ({secs[batches[0]] / secs[best]:.2f}× batch {batches[0]})"])
    if write:
        write_table("infer", stamp(command) + f"\n\nOne {'×'.join(map(str, shape))} volume, 3-slice context, logits "
                    f"resized to 256² before argmax; seconds per volume, median of {repeats} interleaved repeats, by "
                    "slices per forward pass. \"auto\" marks what `uh.predict_slices` uses on the CPU when no batch "
                    "size is given (`uh.inference_batch_size`).\n\n"
                    + md_table(["U-Net", "device"] + [f"batch {b} (s)" for b in batches] + ["fastest"], rows))
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="also the full preset's U-Net (slow on CPU)")
    a = ap.parse_args()
    presets = ("quick", "full") if a.full else ("quick",)
    print(run(repeats=a.repeats, presets=presets,
              command=f"python bench/bench_infer.py --repeats {a.repeats}{' --full' if a.full else ''}"))
