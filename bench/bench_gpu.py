"""GPU throughput (run only on a CUDA machine): fp32 + standard DataLoader vs AMP + channels_last + resident data.

    python bench/bench_gpu.py [--seconds 240]

Prints one JSON line; with --write it also rewrites the GPU table of BENCHMARKS.md. Not run by
run_all.py on machines without CUDA.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_train import MemmapSlices, _LazyLoader
from common import WORK, md_table, stamp, write_table

import unet_helpers as uh


def run(image_size: int = 256, batch: int = 32, steps: int = 40, write: bool = False) -> dict:
    """Slices/s of the full-preset U-Net at ``image_size``² for both setups."""
    assert torch.cuda.is_available(), "bench_gpu.py needs a CUDA device"
    dev = torch.device("cuda")
    data = WORK / "gpu_data"
    uh.make_synthetic_dataset(data, n_cases=8, shape=(256, 256, 96), seed=9, progress=False)
    cached = uh.preprocess_dataset(uh.find_cases(data), WORK / "gpu_cache", image_size, progress=False)
    index = uh.select_slices(cached, 0.2, 0)
    p = uh.PRESETS["full"]
    out = {}
    for name in ("fp32+DataLoader", "amp+channels_last+resident"):
        torch.manual_seed(0)
        fast = name != "fp32+DataLoader"
        fmt = torch.channels_last if fast else torch.contiguous_format
        model = uh.UNet(3, 3, p["BASE_CHANNELS"], p["DEPTH"]).to(dev, memory_format=fmt)
        opt = torch.optim.AdamW(model.parameters(), 1e-3)
        loss_fn = uh.make_loss("dice_ce").to(dev)
        if fast:
            s = uh.SliceSet(cached, 3, dev)
            sampler = uh.TumorAwareSampler(index, s.has_liver, s.has_tumor, batch, 0.33, 0.17, 0)
            batches = lambda s=s, sampler=sampler: (s.batch(b) for b in sampler.epoch(0)[:steps])  # noqa: E731
        else:
            loader = torch.utils.data.DataLoader(MemmapSlices(cached, index, 3), batch_size=batch, shuffle=True,
                                                 num_workers=4, pin_memory=True, drop_last=True,
                                                 persistent_workers=True)
            batches = lambda loader=loader: _LazyLoader(loader, steps)  # noqa: E731
        scaler = torch.amp.GradScaler("cuda", enabled=fast and not uh._native_bf16())
        for _rep in range(2):  # the first pass warms up cuDNN and the loader
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            n = 0
            for x, y in batches():
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                x, y = uh.augment_batch(x, y)
                with uh._autocast(dev, fast):
                    loss, _ = loss_fn(model(x.contiguous(memory_format=fmt)), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                n += len(x)
            torch.cuda.synchronize()
            out[name] = n / (time.perf_counter() - t0)
    out["speedup"] = out["amp+channels_last+resident"] / out["fp32+DataLoader"]
    if write:
        write_table("gpu", stamp("python bench/bench_gpu.py --write") + "\n\n" + md_table(
            ["setup", "slices/s"], [[k, f"{v:.0f}"] for k, v in out.items() if k != "speedup"])
            + f"\n\nspeed-up: **{out['speedup']:.2f}×**")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    print(json.dumps(run(write=a.write)))
