"""The studies' shared library: training an arm for a time budget, results files, paired comparisons of arms.

Used by ``tumour_study.py`` (synthetic tumour arms), ``real_liver.py`` (recipes on the real liver slices) and
``lits_conventions.py`` (the stored studies rescored in LiTS's conventions). The product (``unet_helpers``) never
imports it. An arm is a recipe (``uh.RECIPES`` keys) plus the study's own keys: ``image_size``, ``depth`` /
``stage2_depth``, ``stage2_window_px`` (stage 2's windows in pixels), ``stage2_init`` ("stage1": stage 2 starts
from stage 1's weights), ``coarse_size`` (one network, whole slices at that size first), ``min_stage1_steps``,
``lesion_settings``, ``strong_augment`` and ``loss: "tversky_ce"`` (augmentation and a loss the product does not
ship: :func:`arm_step`).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import WORK, case_score, hierarchical_bootstrap

import unet_helpers as uh


def load(path: Path) -> list[dict]:
    """The rows stored at ``path`` (none when the file does not exist yet)."""
    return json.loads(path.read_text()) if path.exists() else []


def save(rows: list[dict], path: Path) -> None:
    """Store rows atomically (NaN as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    uh.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(uh.json_safe(rows), indent=1)))


def mean_sd(vals: list[float | None]) -> str:
    """'mean ± sample sd' of the non-missing values ('-' when there are none, the value alone when one)."""
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"


def paired(rows: list[dict], arm_a: str, arm_b: str, key: str = "dice_tumor", n_boot: int = 10000,
           seed: int = 0) -> dict | None:
    """Paired difference A − B of a per-case score: same seeds, same cases.

    The 95 % interval resamples the seeds and the cases (``common.hierarchical_bootstrap``), so that it holds
    the noise of training as well as that of the cases: two runs of one recipe differ within it. Tumour Dice
    (``dice_tumor``) uses only the cases with tumour; every other key every case.

    Returns:
        The bootstrap's mean, low, high, seeds and cases, plus how many cases A and B each did better on; None
        when the arms share no case.
    """
    def by(arm):
        return {(r["seed"], c["case"]): case_score(c, key) for r in rows if r["arm"] == arm for c in r["per_case"]
                if key != "dice_tumor" or c["has_tumor"]}
    a, b = by(arm_a), by(arm_b)
    both = set(a) & set(b)
    seeds = sorted({s for s, _ in both})
    cases = sorted(c for c in {c for _, c in both} if all((s, c) in both for s in seeds))
    if not cases:
        return None
    diff = np.array([[a[s, c] - b[s, c] for c in cases] for s in seeds])
    per_case = diff.mean(0)
    return {**hierarchical_bootstrap(diff, n_boot, seed), "a_better": int((per_case > 0).sum()),
            "b_better": int((per_case < 0).sum())}


CALIBRATION_STEPS = 30  # steps per timed epoch in steps_for


def cached(files: list, cfg: dict, roi: int | None) -> list:
    """Preprocessed cases for an arm (the cache keys on size, window and ROI)."""
    return uh.preprocess_dataset(files, WORK / "tumour_cache", cfg["image_size"], cfg["hu_window"],
                                 progress=False, roi_size=roi)


STRONG_AUGMENT = {"contrast": 0.25, "gamma": 0.4}  # nnU-Net-like intensity ranges (strong_intensity)


class TverskyCELoss(uh.DiceCELoss):
    """CE + Tversky: the soft Dice with false calls weighed ``alpha`` and misses ``beta`` (0.5 and 0.5: Dice)."""

    def __init__(self, alpha: float = 0.3, beta: float = 0.7, smooth: float = 1e-5):
        super().__init__(smooth=smooth)
        self.alpha, self.beta = alpha, beta

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits = logits.float()
        ce = F.cross_entropy(logits, target)
        tp, fp, fn = self.soft_counts(logits, target)
        loss = 1 - ((tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)).mean()
        return ce + loss, {"ce": ce.detach(), "dice": loss.detach()}


def strong_intensity(x: torch.Tensor, generator: torch.Generator, p: float = 0.8, contrast: float = 0.25,
                     gamma: float = 0.4) -> torch.Tensor:
    """In a share ``p`` of the samples: deviations from the image's mean scaled by 1 ± ``contrast``, then the image
    (clipped to [0, 1]) raised to a power in exp(± ``gamma``); the others pass unchanged. Draws on the CPU."""
    r = torch.rand(3, x.shape[0], 1, 1, 1, generator=generator).to(x.device, x.dtype)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    out = (mean + (x - mean) * (1 + (r[1] * 2 - 1) * contrast)).clamp(0, 1) ** torch.exp((r[2] * 2 - 1) * gamma)
    return torch.where(r[0] < p, out, x)


def arm_step(cfg: dict, seed: int):
    """The training step of an arm with a loss (``loss: "tversky_ce"``) or augmentation (``strong_augment``) the
    product does not ship, as ``uh.train(..., step=)`` takes it; None (the product's step) for every other arm."""
    loss = TverskyCELoss() if cfg.get("loss") == "tversky_ce" else None
    gen = torch.Generator().manual_seed(seed) if cfg.get("strong_augment") else None
    if loss is None and gen is None:
        return None

    def step(state: uh.TrainState, x: torch.Tensor, y: torch.Tensor, grad_clip: float = 1.0) -> tuple:
        x = strong_intensity(x, gen, **STRONG_AUGMENT) if gen is not None else x
        return uh.train_step(replace(state, loss_fn=loss if loss is not None else state.loss_fn), x, y, grad_clip)

    return step


def train_config(cfg: dict, seed: int, batch: int, steps: int, lr: float = 2e-3) -> uh.TrainConfig:
    """The arm's training settings for ``steps`` optimizer steps (4 epochs, warm-up + cosine): the recipe's, with
    the arm's own lesion-contrast settings (``lesion_settings``, e.g. {"p": 1.0}: every tumour slice); a loss the
    product does not ship is :func:`arm_step`'s (the settings name the product's)."""
    if cfg.get("loss", "dice_ce") not in (*uh.LOSSES, "tversky_ce"):
        raise ValueError(f"an arm's loss must be one of {[*uh.LOSSES, 'tversky_ce']}, got {cfg['loss']!r}")
    rec = cfg if cfg.get("loss", "dice_ce") in uh.LOSSES else {**cfg, "loss": "dice_ce"}
    tc = uh.recipe_train_config(rec, 4, batch, lr, seed, max(1, steps // 4), cfg.get("stage", 1), cfg.get("patch"))
    extra = {f"lesion_{k}": v for k, v in cfg.get("lesion_settings", {}).items()}
    return replace(tc, augment=replace(tc.augment, **extra)) if extra else tc


def new_model(cfg: dict, seed: int, base: int, init: uh.UNet | None = None) -> uh.UNet:
    """A U-Net of depth 4 (``cfg["depth"]`` where the arm sets one for this stage): fresh, or with ``init``'s
    weights where given."""
    uh.set_determinism(seed)
    model = uh.UNet(cfg["context"], 3, base, cfg.get("depth") or 4)
    if init is not None:
        model.load_state_dict(init.state_dict())
    return model


def stage_init(cfg: dict, name: str, models: dict) -> uh.UNet | None:
    """The trained network a stage starts from: stage 1's for stage 2 where the arm says ``stage2_init="stage1"``
    (stage 1 trains first), the coarse network's for stage 1 where the arm trains one (``coarse_size``), else None
    (random weights)."""
    if name == "stage1" and "coarse" in models:
        return models["coarse"]
    return models["stage1"] if name == "stage2" and cfg.get("stage2_init") == "stage1" else None


def steps_for(seconds: float, cases: list, cfg: dict, seed: int, batch: int, base: int, out: Path) -> int:
    """Optimizer steps that fill ``seconds`` here: the library's training loop timed for 3 epochs of
    ``CALIBRATION_STEPS`` steps.

    The faster of epochs 2 and 3 is used (the first pays for start-up; anything else running on the
    machine only slows an epoch down); the calibration itself is not counted in the arm's training time. Each
    result row records its ``calibration_steps`` (rows of BENCHMARKS.md §5g and before: 10).
    """
    data = uh.SliceSet(cases, cfg["context"])
    index = uh.select_slices(cases, cfg["empty_fraction"], seed)
    n = CALIBRATION_STEPS
    tc = replace(train_config(cfg, seed, batch, 4 * n), epochs=3, steps_per_epoch=n)
    hist = uh.train(new_model(cfg, seed, base), data, index, tc, out, resume=False, progress=False,
                    step=arm_step(cfg, seed))
    per_step = min(h["epoch_seconds"] for h in hist[1:]) / n
    return max(8, int(seconds / per_step))


def fit(cases: list, cfg: dict, seed: int, batch: int, base: int, steps: int, out: Path,
        init: uh.UNet | None = None) -> uh.UNet:
    """Train one network of an arm for ``steps`` steps (from ``init``'s weights where given); its final checkpoint
    is ``out/last.pt``."""
    model = new_model(cfg, seed, base, init)
    uh.train(model, uh.SliceSet(cases, cfg["context"]), uh.select_slices(cases, cfg["empty_fraction"], seed),
             train_config(cfg, seed, batch, steps), out, resume=False, progress=False, step=arm_step(cfg, seed))
    return model


def stage_config(cfg: dict, name: str) -> dict:
    """An arm's settings for one stage: stage 2 takes the arm's window (``stage2_window_px``) and depth."""
    stage2 = name == "stage2"
    return {**cfg, "patch": cfg.get("stage2_window_px") if stage2 else None,
            "depth": cfg.get("stage2_depth") if stage2 else None, "stage": 2 if stage2 else 1}


def budget_split(cfg: dict, calibrate, seconds: float) -> dict[str, int]:
    """Optimizer steps per network that fill ``seconds`` of training, split as the product splits a cascade.

    ``calibrate(name, seconds)`` gives the steps that fill ``seconds`` for that network here (:func:`steps_for`).
    A cascade gives stage 1 its ``stage1_share`` of the time, but at least ``min_stage1_steps`` steps (default
    ``uh.CASCADE_MIN_STAGE1_STEPS``), and stage 2 the time left; where the floor takes more than half the budget,
    one stage trains it all (``uh.cascade_plan``, with the budget counted in stage-1 steps). One network trained
    coarse to fine (``coarse_size``) gets the share at the coarse size and the rest at its own.

    Returns:
        {"stage1": steps} for one stage, with "stage2" for a cascade, with "coarse" coarse to fine.
    """
    share = cfg.get("stage1_share") or uh.CASCADE_STAGE1_SHARE
    if cfg.get("coarse_size"):
        return {"coarse": calibrate("coarse", seconds * share), "stage1": calibrate("stage1", seconds * (1 - share))}
    if not cfg["cascade"]:
        return {"stage1": calibrate("stage1", seconds)}
    steps1 = calibrate("stage1", seconds * share)
    total = max(1, round(steps1 / share))  # the whole budget in stage-1 steps
    first, second, _ = uh.cascade_plan(total, share, 1, cfg.get("min_stage1_steps", uh.CASCADE_MIN_STAGE1_STEPS))
    if not second:
        return {"stage1": calibrate("stage1", seconds)}
    if first <= steps1:  # the floor does not bind: each stage its share of the time
        return {"stage1": steps1, "stage2": calibrate("stage2", seconds * (1 - share))}
    return {"stage1": first, "stage2": calibrate("stage2", seconds * second / total)}


def train_arm(cfg: dict, train_files: list, seconds: float, seed: int, batch: int, base: int,
              out: Path) -> tuple[dict, dict, int | None, float]:
    """Train an arm's networks for ``seconds`` of training here (calibration not counted), as :func:`budget_split`
    divides the time; each network's final checkpoint is ``out/<name>/last.pt``.

    Returns:
        ({name: final network}, {name: optimizer steps}, the liver-box size or None (one stage), training seconds).
    """
    roi = uh.roi_size_for(uh.canonical_shape(train_files[0].image)) if cfg["cascade"] else None
    tr = cached(train_files, cfg, roi)
    conf = {name: stage_config(cfg, name) for name in ("stage1", "stage2")}
    data = {"stage1": tr, "stage2": uh.roi_cases(tr) if roi else None}
    if cfg.get("coarse_size"):
        conf["coarse"] = stage_config({**cfg, "image_size": cfg["coarse_size"]}, "coarse")
        data["coarse"] = cached(train_files, conf["coarse"], None)

    def calibrate(name: str, sec: float) -> int:
        return steps_for(sec, data[name], conf[name], seed, batch, base, out / "calibration")

    steps = budget_split(cfg, calibrate, seconds)
    if roi and "stage2" not in steps:  # recorded: the row's roi_size is None and its steps have no stage 2
        print(f"{out.name}: stage 1's floor of steps takes more than half of {seconds:g} s here: one stage trains "
              "(as the product would)", flush=True)
    roi = roi if "stage2" in steps else None
    t0 = time.perf_counter()
    models: dict = {}
    for name in steps:  # coarse before stage 1, stage 1 before stage 2
        models[name] = fit(data[name], conf[name], seed, batch, base, steps[name], out / name,
                           stage_init(cfg, name, models))
    return models, steps, roi, time.perf_counter() - t0
