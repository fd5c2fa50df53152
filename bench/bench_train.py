"""Training throughput: slices/s, achieved FLOP/s as a share of measured matmul peak, data-wait share.

Two data/compute paths in the same process, on the default CPU (quick-preset) U-Net:
  plain: contiguous tensors, a standard torch DataLoader reading the memory-mapped cache per slice, and
         the textbook step (forward, loss, backward, AdamW step) written out here: the deliberately naive
         baseline;
  ours:  the product: channels_last, the whole training set as one resident tensor gathered by index
         (uh.SliceSet), augmentation on the training device, and the library's own step (uh.train_step,
         with its gradient clipping and learning-rate schedule).

And the cascade's stage 2 on windows of its 160² liver boxes (64² and 96², batch 8 as in the tumour study),
in the same process:
  before: the whole box augmented, then the window cut (random_patches as it was); AdamW's per-parameter loop;
  now:    the window cut inside the augmentation, which warps only its pixels (uh.augment_batch(window=...)),
          and AdamW fused (uh.adamw), as uh.train_epoch does.
And stage 2's step on 64² windows (the default recipe's at 256²) with a U-Net of depth 4 and of depth 3.

    python bench/bench_train.py [--steps 15] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from common import WORK, md_table, stamp, write_table
from torch.utils.flop_counter import FlopCounterMode

import unet_helpers as uh


class MemmapSlices(torch.utils.data.Dataset):
    """The usual map-style Dataset: one 2.5D slice stack per item, read from the memory-mapped cache."""

    def __init__(self, cases, index, context):
        self.items = []
        offset = 0
        for ci, c in enumerate(cases):
            self.items += [(ci, z) for z in range(c.n_slices)]
            offset += c.n_slices
        self.items = [self.items[i] for i in index]
        self.cases, self.context = cases, context

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        ci, z = self.items[i]
        c = self.cases[ci]
        idx = uh.context_indices(c.n_slices, self.context)[z]
        x = torch.from_numpy(np.asarray(c.image[idx], np.float32))
        return x, torch.from_numpy(np.asarray(c.label[z], np.int64))


def matmul_peak(n: int = 4096, repeats: int = 5) -> float:
    """Dense fp32 matmul FLOP/s of this machine (median)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


def step_flops(model, x, y, loss_fn) -> int:
    """FLOPs of one forward + backward pass (torch.utils.flop_counter)."""
    with FlopCounterMode(display=False) as fc:
        loss, _ = loss_fn(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def _naive_step(model, opt, loss_fn):
    """The textbook training step, for the naive baseline only (the product's is uh.train_step)."""
    def step(x, y):
        loss, _ = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _loop(step, batches, fmt, augment=True, gen=None):
    """Run ``step(x, y)`` over the batches; return (total seconds, seconds getting/augmenting data, slices)."""
    data_t, n = 0.0, 0
    t0 = time.perf_counter()
    it = iter(batches)
    while True:
        td = time.perf_counter()
        try:
            x, y = next(it)
        except StopIteration:
            break
        if augment:
            x, y = uh.augment_batch(x, y, generator=gen)
        x = x.contiguous(memory_format=fmt)
        data_t += time.perf_counter() - td
        step(x, y)
        n += len(x)
    return time.perf_counter() - t0, data_t, n


def run(image_size: int = 128, base: int = 16, depth: int = 4, context: int = 3, batch: int = 16, steps: int = 15,
        repeats: int = 3, n_cases: int = 4, write: bool = True, command: str = "python bench/bench_train.py") -> dict:
    """Measure both paths; return (and optionally write) the numbers."""
    data = WORK / "train_data"
    uh.make_synthetic_dataset(data, n_cases=n_cases, shape=(192, 192, 48), seed=5, progress=False)
    cached = uh.preprocess_dataset(uh.find_cases(data), WORK / "train_cache", image_size, progress=False)
    index = uh.select_slices(cached, 0.2, seed=0)
    resident = uh.SliceSet(cached, context)
    sampler = uh.TumorAwareSampler(index, resident.has_liver, resident.has_tumor, batch, 0.33, 0.17, seed=0)
    loader = torch.utils.data.DataLoader(MemmapSlices(cached, index, context), batch_size=batch, num_workers=0,
                                         sampler=torch.utils.data.RandomSampler(index, replacement=True,
                                                                                num_samples=10**6))
    peak = matmul_peak()
    loss_fn = uh.make_loss("dice_ce")
    results = {}
    for name, fmt in (("plain", torch.contiguous_format), ("ours", torch.channels_last)):
        torch.manual_seed(0)
        model = uh.UNet(context, 3, base, depth).to(memory_format=fmt)
        x0, y0 = resident.batch(sampler.epoch(0)[0])
        flops = step_flops(model, x0.contiguous(memory_format=fmt), y0, loss_fn)
        if name == "plain":
            step = _naive_step(model, torch.optim.AdamW(model.parameters(), 1e-3), loss_fn)
        else:
            cfg = uh.TrainConfig(epochs=repeats + 1, batch_size=batch, lr=1e-3, steps_per_epoch=steps)
            state = uh.make_train_state(model, cfg, steps, torch.device("cpu"))
            step = lambda x, y, _s=state: uh.train_step(_s, x, y)  # noqa: E731
        gen = torch.Generator().manual_seed(0)
        per = []
        for r in range(repeats + 1):  # first repeat warms up
            if name == "plain":
                batches = _LazyLoader(loader, steps)
            else:
                epochs = [b for e in range(r * 100, r * 100 + 100) for b in sampler.epoch(e)]
                batches = (resident.batch(b) for b in epochs[:steps])
            total, data_t, n = _loop(step, batches, fmt, gen=gen)
            assert n == steps * batch, (n, steps * batch)
            if r:
                per.append((total, data_t))
        total = statistics.median(t for t, _ in per)
        data_t = statistics.median(d for _, d in per)
        results[name] = {"slices_per_s": steps * batch / total, "flops_per_step": flops,
                         "achieved_flops": flops * steps / total, "share_of_peak": flops * steps / total / peak,
                         "compute_share_of_peak": flops * steps / (total - data_t) / peak,
                         "data_wait": data_t / total, "steps": steps}
    results["peak_flops"] = peak
    if write:
        label = {"plain": "plain: contiguous tensors, torch DataLoader over the memory-mapped cache, textbook step",
                 "ours": "ours: channels_last, resident tensor gathered by index (uh.SliceSet), uh.train_step"}
        rows = [[label[n], f"{r['slices_per_s']:.1f}", f"{r['achieved_flops'] / 1e9:.0f}", f"{r['share_of_peak']:.0%}",
                 f"{r['compute_share_of_peak']:.0%}", f"{r['data_wait']:.1%}",
                 f"{r['slices_per_s'] / results['plain']['slices_per_s']:.2f}×"]
                for n, r in results.items() if n != "peak_flops"]
        write_table("train", stamp(command) + f"\n\nU-Net base {base}, depth {depth}, {context}-slice input, "
                    f"{image_size}², batch {batch}, fp32, training steps incl. augmentation; {steps} steps, median "
                    f"of {repeats} repeats. One step = {results['ours']['flops_per_step'] / 1e9:.1f} GFLOP "
                    f"(torch.utils.flop_counter). Measured dense fp32 matmul peak (4096²): "
                    f"{peak / 1e9:.0f} GFLOP/s.\n\n" + md_table(
                        ["path", "slices/s", "GFLOP/s", "share of matmul peak", "same, compute only",
                         "data wait", "vs plain"], rows))
    return results


def _random_patches_before(x, y, size, gen):
    """``uh.random_patches`` as it was before this change (window centres drawn by w / Exp(1) races over every
    pixel), kept here as the baseline of :func:`windows`."""
    b, s = x.shape[0], x.shape[-1]
    tumour = (y == 2).flatten(1).float()
    weights = 1 + tumour * (s * s / tumour.sum(1, keepdim=True).clamp(min=1))
    centre = (weights / torch.empty_like(weights).exponential_(generator=gen)).argmax(1)
    top, left = (centre // s - size // 2).clamp(0, s - size), (centre % s - size // 2).clamp(0, s - size)
    ar = torch.arange(size)
    rows, cols = (top[:, None] + ar)[:, :, None], (left[:, None] + ar)[:, None, :]
    batch = torch.arange(b)[:, None, None]
    return x.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2), y[batch, rows, cols]


def _window_step(state, gen, size, before):
    """One stage-2 step on ``size`` windows, the way before this change or now (see the module docstring)."""
    def step(x, y):
        if before:
            x, y = _random_patches_before(*uh.augment_batch(x, y, generator=gen), size, gen)
        else:
            x, y = uh.augment_batch(x, y, generator=gen, window=size)
        uh.train_step(state, x.contiguous(memory_format=torch.channels_last), y)
    return step


def _box_batches(roi: int, batch: int, steps: int, n_cases: int) -> list:
    """``steps`` training batches of stage 2's liver boxes (synthetic; tumour/liver oversampling as the default)."""
    data = WORK / "train_data"
    uh.make_synthetic_dataset(data, n_cases=n_cases, shape=(192, 192, 48), seed=5, progress=False)
    cached = uh.preprocess_dataset(uh.find_cases(data), WORK / "train_cache", 128, progress=False, roi_size=roi)
    boxes = uh.roi_cases(cached)
    resident = uh.SliceSet(boxes, 3)
    index = uh.select_slices(boxes, 0.2, seed=0)
    sampler = uh.TumorAwareSampler(index, resident.has_liver, resident.has_tumor, batch, 0.33, 0.17, seed=0)
    return [resident.batch(b) for e in range(50) for b in sampler.epoch(e)][:steps]


def windows(roi: int = 160, sizes=(64, 96), batch: int = 8, steps: int = 30, repeats: int = 5,
            n_cases: int = 4, write: bool = True, command: str = "python bench/bench_train.py") -> dict:
    """Stage 2's training step on windows of its liver boxes, before and now: ms per step (median of repeats,
    the two ways alternating so that drifts of the machine hit both alike) and the ratio."""
    batches = _box_batches(roi, batch, steps, n_cases)
    out = {}
    for size in sizes:
        times = {True: [], False: []}
        for r in range(repeats + 1):  # the first round warms up
            for before in (True, False):
                torch.manual_seed(0)
                model = uh.UNet(3, 3, 16, 4)
                state = uh.make_train_state(model, uh.TrainConfig(epochs=1, batch_size=batch, lr=2e-3), steps,
                                            torch.device("cpu"))
                if before:
                    state.opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
                    state.sched = torch.optim.lr_scheduler.LambdaLR(state.opt, lambda _: 1.0)
                step = _window_step(state, torch.Generator().manual_seed(r), size, before)
                t0 = time.perf_counter()
                for x, y in batches:
                    step(x, y)
                if r:
                    times[before].append((time.perf_counter() - t0) / steps)
        out[size] = {k: statistics.median(v) for k, v in (("before", times[True]), ("now", times[False]))}
    if write:
        rows = [[f"{size}² of {roi}²", f"{t['before'] * 1e3:.1f}", f"{t['now'] * 1e3:.1f}",
                 f"{t['before'] / t['now']:.2f}×"] for size, t in out.items()]
        write_table("train_windows", stamp(command) + f"\n\nStage 2 of the cascade: U-Net base 16, depth 4, "
                    f"3-slice input, batch {batch}, fp32, channels_last, windows of {roi}² liver boxes; "
                    f"{steps} steps, median of {repeats} repeats, the two ways alternating in one process.\n\n"
                    + md_table(["window", "ms per step, before (augment box, cut; AdamW loop)",
                                "ms per step, now (cut inside the augmentation; fused AdamW)", "speed-up"], rows))
    return out


def depths(roi: int = 160, size: int = 64, depths_=(4, 3), batch: int = 8, steps: int = 30, repeats: int = 5,
           n_cases: int = 4, write: bool = True, command: str = "python bench/bench_train.py") -> dict:
    """Stage 2's training step on ``size``² windows with U-Nets of each depth (the product's step, as
    uh.train_epoch runs it), the depths alternating in one process.

    Returns:
        {depth: {"seconds": median seconds per step, "parameters": the U-Net's parameter count}}; the table
        adds the speed-up against the first depth.
    """
    batches = _box_batches(roi, batch, steps, n_cases)
    times = {d: [] for d in depths_}
    params = {}
    for r in range(repeats + 1):  # the first round warms up
        for d in depths_:
            torch.manual_seed(0)
            model = uh.UNet(3, 3, 16, d)
            params[d] = sum(p.numel() for p in model.parameters())
            state = uh.make_train_state(model, uh.TrainConfig(epochs=1, batch_size=batch, lr=2e-3), steps,
                                        torch.device("cpu"))
            step = _window_step(state, torch.Generator().manual_seed(r), size, before=False)
            t0 = time.perf_counter()
            for x, y in batches:
                step(x, y)
            if r:
                times[d].append((time.perf_counter() - t0) / steps)
    out = {d: {"seconds": statistics.median(v), "parameters": params[d]} for d, v in times.items()}
    if write:
        first = out[depths_[0]]["seconds"]
        rows = [[d, f"{o['parameters']:,}", f"{o['seconds'] * 1e3:.1f}", f"{first / o['seconds']:.2f}×"]
                for d, o in out.items()]
        write_table("train_depths", stamp(command) + f"\n\nStage 2 of the cascade on {size}² windows of {roi}² "
                    f"liver boxes: U-Net base 16, 3-slice input, batch {batch}, fp32, channels_last, the product's "
                    f"step (window cut inside the augmentation, fused AdamW); {steps} steps, median of {repeats} "
                    "repeats, the depths alternating in one process.\n\n"
                    + md_table(["depth", "parameters", "ms per step", f"speed-up vs depth {depths_[0]}"], rows))
    return out


class _LazyLoader:
    """Yield ``steps`` batches from a DataLoader, loading each inside the timed loop."""

    def __init__(self, loader, steps):
        self.it, self.steps = iter(loader), steps

    def __iter__(self):
        return self

    def __next__(self):
        if self.steps == 0:
            raise StopIteration
        self.steps -= 1
        return next(self.it)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    command = f"python bench/bench_train.py --steps {a.steps} --repeats {a.repeats}"
    print(run(steps=a.steps, repeats=a.repeats, command=command))
    print(windows(command=command))
    print(depths(command=command))
