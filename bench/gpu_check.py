"""The GPU check: the code paths a Kaggle/Colab GPU user runs, exercised on one GPU in one command.

    python bench/gpu_check.py                 # on a CUDA machine: under 8 minutes on one GPU
    python bench/gpu_check.py --smoke         # tiny sizes on the CPU (CI): every section runs, nothing is timed

Prints one JSON line and saves the results as it goes (``--out``, default ``bench/results/gpu_check_<gpu>.json``): a
section that fails records its error and the ones after it still run; a section that would start after
``--budget-s`` seconds is skipped and says so. Sections:

- ``environment``: torch / CUDA / cuDNN, the GPU, the build's architecture list, the chosen precision, /dev/shm;
- ``stage1_epoch``: the full preset's stage-1 epoch (``uh.train_epoch``: the default recipe's sampler and
  augmentation) for bf16, fp16 + GradScaler and fp32, each with the slices resident on the GPU, in CPU memory
  (pinned, read one batch ahead) and memory-mapped: slices/s, peak memory, skipped fp16 steps, loss agreement;
- ``card_16gb``: a 16 GB card simulated (``torch.cuda.set_per_process_memory_fraction``): where
  ``uh.choose_data_device`` puts the Kaggle set's slices, and a full-preset fp16 step under that cap;
- ``stage2``: the stage-2 step on its mirrored windows (ms per step);
- ``ddp``: ``uh.train(..., replicas=2)`` with two ranks on one GPU (gloo): the run completes (every worker
  checks at the end that all ranks hold the same weights), resumes across world size and precision, a worker's
  error reaches the caller with its traceback, an interrupt stops the workers, the model is back on its device;
- ``notebook``: the whole notebook under papermill: default settings; ``PRESET="full"``, ``EPOCHS=2``; and the
  full preset with stage 1 below the CT's size (``IMAGE_SIZE=128``, ``CASCADE=True``), ``EPOCHS=4``;
- ``inference``: volumes per second for stage 1 alone and with the mirrored stage 2.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import sys
import threading
import time
import traceback
from dataclasses import replace
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from common import ROOT, WORK, machine

import unet_helpers as uh

KAGGLE_SLICES = 123 * 450  # the Kaggle set's slices, assumed as in BENCHMARKS.md §3 (LiTS's mean depth)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _peak_gib(dev: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if dev.type == "cuda" else None


def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _amp(name: str) -> bool | str:
    """``TrainConfig.amp`` for an arithmetic: 'bf16', 'fp16' (GradScaler, as on a T4) or 'fp32' (no autocast)."""
    return False if name == "fp32" else name


class Check:
    """Sizes and data shared by the sections (tiny in smoke mode)."""

    def __init__(self, smoke: bool, device: torch.device):
        self.smoke, self.device = smoke, device
        full = uh.PRESETS["full"]
        self.size = 32 if smoke else full["IMAGE_SIZE"]
        self.base, self.depth = (4, 2) if smoke else (full["BASE_CHANNELS"], full["DEPTH"])
        self.batch = 4 if smoke else full["BATCH_SIZE"]
        self.steps = 2 if smoke else 30
        shape = (48, 48, 12) if smoke else (256, 256, 64)
        self.roi = uh.roi_size_for(shape)
        self.patch = uh.patch_size_for(self.roi, uh.RECIPES["default"]["stage2_window_fraction"], 2 ** self.depth)
        data = WORK / f"gpu_check_data_{'x'.join(map(str, shape))}"
        uh.make_synthetic_dataset(data, n_cases=4 if smoke else 8, shape=shape, seed=11, progress=False)
        self.cases = uh.preprocess_dataset(uh.find_cases(data), WORK / "gpu_check_cache", self.size,
                                           roi_size=self.roi, progress=False)
        self.rec = uh.recipe("default")
        self.index = uh.select_slices(self.cases, self.rec["empty_fraction"], 0)

    def cfg(self, stage: int = 1, window: int | None = None, **kw) -> uh.TrainConfig:
        base = uh.recipe_train_config(self.rec, 2, self.batch, 1e-3, 0, self.steps, stage, window)
        return replace(base, **kw)

    def model(self) -> uh.UNet:
        torch.manual_seed(0)
        return uh.UNet(self.rec["context"], 3, self.base, self.depth)


def _timed_epoch(ck: Check, data: uh.SliceSet, index: np.ndarray, cfg: uh.TrainConfig, amp: bool | str) -> dict:
    """One timed ``uh.train_epoch`` after an untimed one (cuDNN autotuning, allocator warm-up)."""
    state = uh.make_train_state(ck.model(), replace(cfg, amp=amp), cfg.steps_per_epoch, ck.device)
    sampler = uh.make_sampler(data, index, cfg)
    uh.train_epoch(state, data, uh.epoch_batches(sampler, 99, cfg.steps_per_epoch), cfg, 99, progress=False)
    scale0 = state.scaler.get_scale() if state.scaler.is_enabled() else None
    _sync(ck.device)
    _reset_peak(ck.device)
    t0 = time.perf_counter()
    ce, dice = uh.train_epoch(state, data, uh.epoch_batches(sampler, 0, cfg.steps_per_epoch), cfg, 0, progress=False)
    _sync(ck.device)
    secs = time.perf_counter() - t0
    out = {"slices_per_s": round(cfg.steps_per_epoch * cfg.batch_size / secs, 1),
           "ms_per_step": round(1000 * secs / cfg.steps_per_epoch, 2), "peak_gib": _peak_gib(ck.device),
           "train_ce": ce, "train_dice_loss": dice}
    if scale0 is not None:  # the scale halves at each skipped step and grows only every 2000 good ones
        out["fp16_skipped_steps"] = round(math.log2(scale0 / state.scaler.get_scale()))
    return out


def section_environment(ck: Check) -> dict:
    env = uh.environment(ck.device)
    env.update(cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               arch_list=torch.cuda.get_arch_list() if torch.cuda.is_available() else [],
               unsupported_reason=uh.cuda_unsupported_reason(), machine=machine())
    if ck.device.type == "cuda":
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        env["gpus_visible"] = torch.cuda.device_count()
    with contextlib.suppress(OSError):
        env["dev_shm_gib"] = round(shutil.disk_usage("/dev/shm").total / 2**30, 2)
    return env


def section_stage1_epoch(ck: Check) -> dict:
    """bf16 / fp16 / fp32 x resident / pinned with read-ahead / memory-mapped, same seed and batches."""
    placements = {"gpu_resident": (ck.device, True), "cpu_pinned_readahead": ("cpu", True),
                  "memory_mapped": ("cpu", False)}
    precisions = ("bf16", "fp16", "fp32") if ck.device.type == "cuda" else ("fp32",)
    out: dict = {"net": f"base {ck.base}, depth {ck.depth}, {ck.size}², batch {ck.batch}, {ck.steps} steps"}
    for place, (dev, resident) in placements.items():
        data = uh.SliceSet(ck.cases, ck.rec["context"], dev, resident=resident)
        for prec in precisions:
            out[f"{prec}/{place}"] = _timed_epoch(ck, data, ck.index, ck.cfg(), _amp(prec))
        del data
    ref = out.get("fp32/gpu_resident")
    for key, row in out.items():
        if isinstance(row, dict) and ref and key.endswith("gpu_resident"):
            row["ce_rel_diff_vs_fp32"] = round(abs(row["train_ce"] - ref["train_ce"]) / ref["train_ce"], 4)
    return out


def section_card_16gb(ck: Check) -> dict:
    """What a 16 GB card (a T4) would do: the data-placement choice for the Kaggle set, and one fp16 step."""
    if ck.device.type != "cuda":
        return {"skipped": "needs CUDA"}
    total = torch.cuda.get_device_properties(0).total_memory
    cap = 15.0 * 2**30  # what a T4 reports usable
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        kaggle_bytes = KAGGLE_SLICES * 256 * 256 * 3  # float16 image + uint8 label per pixel
        used = torch.cuda.memory_allocated()
        with mock.patch.object(torch.cuda, "mem_get_info", lambda *_: (int(cap - used), int(cap))):
            where = uh.choose_data_device(kaggle_bytes, ck.device)
        out = {"kaggle_set_gib": round(kaggle_bytes / 2**30, 2), "choose_data_device": str(where)}
        _reset_peak(ck.device)
        # fp16 autocast and the GradScaler, as on a T4
        state = uh.make_train_state(ck.model(), ck.cfg(amp="fp16"), 4, ck.device)
        x = torch.rand(ck.batch, 3, ck.size, ck.size, device=ck.device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 3, (ck.batch, ck.size, ck.size), device=ck.device)
        for _ in range(3):
            uh.train_step(state, x, y)
        _sync(ck.device)
        out["fp16_step_peak_gib_under_cap"] = _peak_gib(ck.device)
        out["fits"] = True
        return out
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def section_stage2(ck: Check) -> dict:
    """Stage 2's step: mirrored windows of PATCH_SIZE cut from the liver boxes, resident on the device."""
    roi = uh.roi_cases(ck.cases)
    data = uh.SliceSet(roi, ck.rec["context"], ck.device)
    cfg = ck.cfg(stage=2, window=ck.patch)  # the default recipe mirrors stage 2
    row = _timed_epoch(ck, data, uh.select_slices(roi, ck.rec["empty_fraction"], 0), cfg, ck.device.type == "cuda")
    return {"roi_size": ck.roi, "patch_size": ck.patch, "batch": ck.batch, **row}


def _worker_pids() -> list[int]:
    """Live processes started by this one through multiprocessing's spawn (the DDP workers)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            ppid = int(next(line for line in (p / "status").read_text().splitlines() if line.startswith("PPid"))
                       .split()[1])
            if ppid == os.getpid() and b"spawn_main" in (p / "cmdline").read_bytes():
                pids.append(int(p.name))
    return pids


def section_ddp(ck: Check) -> dict:
    """The product's multi-process path, two ranks on one device."""
    out: dict = {}
    runs = WORK / "gpu_check_ddp"
    shutil.rmtree(runs, ignore_errors=True)
    train = uh.SliceSet(ck.cases, ck.rec["context"], ck.device)
    cfg = ck.cfg(epochs=1)
    model = ck.model()
    t0 = time.perf_counter()
    h = uh.train(model, train, ck.index, cfg, runs / "a", train, ck.index[:64], device=ck.device, progress=False,
                 replicas=2)
    out["two_ranks_seconds"] = round(time.perf_counter() - t0, 1)
    out["two_ranks_completed_ranks_agree"] = len(h) == 1
    out["files_written"] = sorted(p.name for p in (runs / "a").iterdir())
    out["model_on_device_after"] = str(next(model.parameters()).device)
    # resume across world size and precision: one fp16 process stopped after its first epoch, then two ranks
    steps = itertools.count()

    def step_then_stop(state, x, y, grad_clip=1.0):  # stops at the first step of epoch 2 (epoch 1 is saved)
        if next(steps) == ck.steps:
            raise KeyboardInterrupt("stopped after one epoch")
        return uh.train_step(state, x, y, grad_clip)

    with contextlib.suppress(KeyboardInterrupt):
        uh.train(model, train, ck.index, replace(cfg, epochs=2, amp="fp16"), runs / "r", device=ck.device,
                 progress=False, step=step_then_stop)
    h = uh.train(model, train, ck.index, replace(cfg, epochs=2), runs / "r", device=ck.device, progress=False,
                 replicas=2)
    out["resumed_epochs"] = [row["epoch"] for row in h]
    out["resumed_processes"] = [row["processes"] for row in h]  # expected [1, 2]
    # a worker that raises: the caller sees its error and traceback; the model is back on its device
    try:
        uh.train(model, train, ck.index, replace(cfg, loss="no_such_loss"), runs / "b", device=ck.device,
                 progress=False, replicas=2)
        out["worker_error_reached_caller"] = False
    except Exception as err:  # noqa: BLE001 - what reaches the caller is the result
        text = str(err)
        out["worker_error_reached_caller"] = "no_such_loss" in text and "Traceback" in text
    out["model_on_device_after_error"] = str(next(model.parameters()).device)
    # an interrupt (Jupyter's stop button sends SIGINT) stops the workers: sent once they have written an epoch
    def interrupt_when_training(log: Path = runs / "c" / "history.json", limit_s: float = 300.0) -> None:
        t0 = time.perf_counter()
        while not log.exists() and time.perf_counter() - t0 < limit_s:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)

    # Python's own SIGINT handler, also where the shell started this process with SIGINT ignored (a background job)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=interrupt_when_training, daemon=True).start()
    try:
        uh.train_replicated(2, model, train, ck.index, replace(cfg, epochs=10**6), runs / "c", device=ck.device,
                            progress=False, poll_s=1.0)
        out["interrupt"] = "training ended before the interrupt"
    except KeyboardInterrupt:
        time.sleep(2)
        out["interrupt_workers_left"] = len(_worker_pids())
    finally:
        signal.signal(signal.SIGINT, previous)
    out["model_on_device_after_interrupt"] = str(next(model.parameters()).device)
    return out


def section_notebook(ck: Check) -> dict:
    """The whole notebook under papermill: default settings, then the full preset for 2 epochs."""
    import papermill
    work = WORK / "gpu_check_notebook"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in ("liver_segmentation.ipynb", "unet_helpers.py"):
        shutil.copy(ROOT / name, work / name)
    tiny = {"SYNTHETIC_CASES": 5, "SYNTHETIC_SHAPE": [64, 64, 24], "IMAGE_SIZE": 32, "EPOCHS": 2, "BATCH_SIZE": 8,
            "BASE_CHANNELS": 4, "DEPTH": 2, "STEPS_PER_EPOCH": 3, "VAL_FRACTION": 0.4}
    runs = {"default": {}, "full_2_epochs": {"PRESET": "full", "EPOCHS": 2},
            # the full preset's net with stage 1 below the CT's in-plane size, as on 512² LiTS; CASCADE = True keeps
            # the cascade in a budget too small for uh.cascade_plan's stage-1 floor
            "full_cascade_4_epochs": {"PRESET": "full", "IMAGE_SIZE": 32 if ck.smoke else 128, "EPOCHS": 4,
                                      "CASCADE": True}}
    out = {}
    for name, params in runs.items():
        params = {**(tiny if ck.smoke else {}), **params, "OUTPUT_DIR": f"out_{name}"}
        t0 = time.perf_counter()
        try:
            papermill.execute_notebook(str(work / "liver_segmentation.ipynb"), str(work / f"{name}.ipynb"),
                                       parameters=params, cwd=str(work), progress_bar=False, kernel_name="python3")
        except Exception as err:  # noqa: BLE001 - recorded, the next run still goes
            out[name] = {"error": str(err)[-1500:]}
            continue
        m = json.loads((work / f"out_{name}" / "metrics.json").read_text())
        s = m["summary"]
        out[name] = {"seconds": round(time.perf_counter() - t0, 1), "preset": m["config"]["PRESET"],
                     "cascade": m["config"]["CASCADE"], "gpus": m["config"]["GPUS"],
                     "precision": m["env"].get("precision"), "train_seconds": round(m["timing"]["train_seconds"], 1),
                     "slices_per_second": round(m["timing"]["slices_per_second"], 1),
                     "synthetic_dice_liver": s.get("dice_liver"), "synthetic_dice_tumor": s.get("dice_tumor")}
    return out


def section_inference(ck: Check) -> dict:
    """Volumes per second for stage 1 alone and for the cascade with the mirrored stage 2 (untrained nets)."""
    model = ck.model().to(ck.device, memory_format=torch.channels_last)
    stage2 = uh.Stage2(ck.model().to(ck.device, memory_format=torch.channels_last), ck.roi, mirror=True)
    cases = ck.cases[:2]
    # an untrained stage 1 calls no liver, so stage 2 would see no box: give it the truth's liver as stage 1
    out = {}
    for name, s2 in (("stage1", None), ("stage1+mirrored_stage2", stage2)):
        times = []
        for _ in range(2 if ck.smoke else 3):
            _sync(ck.device)
            t0 = time.perf_counter()
            for c in cases:
                uh.predict_slices(model, np.asarray(c.image), c.meta["shape"][:2], ck.rec["context"], ck.device)
                if s2 is not None:
                    full = uh.window_hu(uh.load_case(c.meta["image_path"]).image, c.meta["hu_window"])
                    uh.predict_cascade(c.label_full, full, c.meta["spacing"], s2, ck.rec["context"], ck.device)
            _sync(ck.device)
            times.append(time.perf_counter() - t0)
        out[name] = {"volumes_per_s": round(len(cases) / statistics.median(times), 2),
                     "slices_per_s": round(sum(c.n_slices for c in cases) / statistics.median(times), 1)}
    return out


SECTIONS = {"environment": section_environment, "stage1_epoch": section_stage1_epoch,
            "card_16gb": section_card_16gb, "stage2": section_stage2, "ddp": section_ddp,
            "notebook": section_notebook, "inference": section_inference}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: every section runs, quickly")
    ap.add_argument("--out", type=Path, default=None, help="where results are saved as they come")
    ap.add_argument("--budget-s", type=float, default=450.0, help="start no section after this many seconds")
    ap.add_argument("--only", nargs="*", default=None, help="run only these sections")
    a = ap.parse_args(argv)
    device = torch.device("cpu") if a.smoke else uh.pick_device("cuda")
    gpu = torch.cuda.get_device_name(0).split()[-1].lower() if device.type == "cuda" else "cpu"
    out_path = a.out or (WORK / "gpu_check_smoke.json" if a.smoke else ROOT / "bench" / "results" /
                         f"gpu_check_{gpu}.json")
    t_start = time.perf_counter()
    ck = Check(a.smoke, device)
    results = {"command": "python bench/gpu_check.py" + (" --smoke" if a.smoke else ""),
               "date": time.strftime("%Y-%m-%d"), "machine": machine(), "setup_seconds": None}
    results["setup_seconds"] = round(time.perf_counter() - t_start, 1)
    for name, fn in SECTIONS.items():
        if a.only is not None and name not in a.only:
            continue
        elapsed = time.perf_counter() - t_start
        if elapsed > a.budget_s:
            results[name] = {"skipped": f"budget: {elapsed:.0f} s of {a.budget_s:.0f} spent"}
        else:
            t0 = time.perf_counter()
            try:
                results[name] = fn(ck)
            except Exception as err:  # noqa: BLE001 - a failing section is a result; the others still run
                results[name] = {"error": f"{type(err).__name__}: {err}"[-2000:],
                                 "traceback": traceback.format_exc()[-3000:]}
            results[name]["section_seconds"] = round(time.perf_counter() - t0, 1)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        uh.atomic_write(out_path, lambda tmp: tmp.write_text(json.dumps(uh.json_safe(results), indent=1)))
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    uh.atomic_write(out_path, lambda tmp: tmp.write_text(json.dumps(uh.json_safe(results), indent=1)))
    return results


if __name__ == "__main__":
    sys.exit(print(json.dumps(uh.json_safe(main()))))
