"""GPU throughput (run on a CUDA machine): the textbook fp32 + DataLoader step vs the product's training step.

    python bench/bench_gpu.py [--write]

Both paths train the full-preset U-Net at 256² on the same synthetic slices. The baseline is the
deliberately naive one: contiguous fp32, a standard torch DataLoader (4 workers, pinned memory) and
the textbook step written out in bench_train.py. The product path is what ``uh.train`` runs: resident
slices (``uh.SliceSet`` on the GPU), augmentation on the device, channels_last and ``uh.train_step``
with mixed precision (bf16 where native, fp16 + GradScaler below). Also reported: peak GPU memory of
each path and the seconds of one ``uh.evaluate`` pass over two volumes. Prints one JSON line; with
--write it also rewrites the GPU table of BENCHMARKS.md. ``--device cpu`` runs a tiny smoke test.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_train import MemmapSlices, _LazyLoader, _naive_step
from common import WORK, md_table, stamp, write_table

import unet_helpers as uh


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def run(image_size: int = 256, batch: int = 32, steps: int = 40, write: bool = False, device: str = "cuda",
        shape: tuple = (256, 256, 96), preset: str = "full", workers: int = 4) -> dict:
    """Slices/s, peak memory and an evaluation pass for both setups."""
    dev = torch.device(device)
    if dev.type == "cuda":
        assert torch.cuda.is_available(), "bench_gpu.py needs a CUDA device (or --device cpu for a smoke test)"
    data = WORK / f"gpu_data_{'x'.join(map(str, shape))}"
    uh.make_synthetic_dataset(data, n_cases=8, shape=tuple(shape), seed=9, progress=False)
    cached = uh.preprocess_dataset(uh.find_cases(data), WORK / "gpu_cache", image_size, progress=False)
    index = uh.select_slices(cached, 0.2, 0)
    p = uh.PRESETS[preset]
    out: dict = {}
    for name in ("fp32+DataLoader", "amp+channels_last+resident"):
        torch.manual_seed(0)
        fast = name != "fp32+DataLoader"
        fmt = torch.channels_last if fast else torch.contiguous_format
        model = uh.UNet(3, 3, p["BASE_CHANNELS"], p["DEPTH"]).to(dev, memory_format=fmt)
        if fast:
            state = uh.make_train_state(model, uh.TrainConfig(epochs=2, batch_size=batch, lr=1e-3), steps, dev)
            step = lambda x, y, _s=state: uh.train_step(_s, x, y)  # noqa: E731
            s = uh.SliceSet(cached, 3, dev)
            sampler = uh.TumorAwareSampler(index, s.has_liver, s.has_tumor, batch, 0.33, 0.17, 0)
            batches = lambda s=s, sampler=sampler: (s.batch(b) for b in uh.epoch_batches(sampler, 0, steps))  # noqa: E731
        else:
            step = _naive_step(model, torch.optim.AdamW(model.parameters(), 1e-3), uh.make_loss("dice_ce").to(dev))
            sampler = torch.utils.data.RandomSampler(index, replacement=True, num_samples=10**6)  # never runs dry
            loader = torch.utils.data.DataLoader(MemmapSlices(cached, index, 3), batch_size=batch, sampler=sampler,
                                                 num_workers=workers, pin_memory=dev.type == "cuda",
                                                 drop_last=True, persistent_workers=workers > 0)
            batches = lambda loader=loader: _LazyLoader(loader, steps)  # noqa: E731
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _rep in range(2):  # the first pass warms up cuDNN and the loader
            _sync(dev)
            t0, n = time.perf_counter(), 0
            for x, y in batches():
                x, y = uh.augment_batch(x.to(dev, non_blocking=True), y.to(dev, non_blocking=True))
                step(x.contiguous(memory_format=fmt), y)
                n += len(x)
            _sync(dev)
            out[name] = n / (time.perf_counter() - t0)
        out[f"{name} peak GiB"] = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    t0 = time.perf_counter()
    uh.evaluate(model, cached[:2], 3, dev, keep_predictions=False, progress=False)
    _sync(dev)
    out["evaluate 2 volumes s"] = time.perf_counter() - t0
    out["speedup"] = out["amp+channels_last+resident"] / out["fp32+DataLoader"]
    if write:
        write_table("gpu", stamp("python bench/bench_gpu.py --write") + "\n\n" + md_table(
            ["measure", "value"], [[k, f"{v:.2f}" if isinstance(v, float) else v] for k, v in out.items()]))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    print(json.dumps(run(write=a.write, device=a.device) if a.device == "cuda" else
                     run(image_size=32, batch=4, steps=3, device=a.device, shape=(48, 48, 12), preset="quick",
                         workers=0)))
