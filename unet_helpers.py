"""Helpers for the liver & liver-tumour CT segmentation tutorial (``liver_segmentation.ipynb``).

The notebook does ``import unet_helpers as uh`` and calls ``uh.name(...)``.  The module is
ordered as the notebook uses it:

0. settings       -- print_env, presets and recipes, resolve_settings, run_dir ("Imports", "Configuration")
1. I/O            -- find_cases, load_case (notebook section "Data", "Look at one volume")
2. preprocessing  -- window_hu, network_slices, 2.5D context, the slice cache, liver box ("Preprocess")
3. data sets      -- split, slice selection, SliceSet, sampler, augmentation ("Preprocess")
4. model          -- DoubleConv, Down, Up, OutConv, UNet ("Model")
5. loss           -- DiceCELoss ("Loss")
6. training       -- train_step and the pieces of train ("Train")
7. evaluation     -- overlap_counts/dice, HD95/ASSD, lesions, evaluate, predict_volume ("Evaluate", "Inference")
8. plots          -- curves, per-case Dice, lesions, cascade, overlays ("Curves", "Look at predictions")
9. synthetic data -- make_synthetic_dataset ("Data", when no real CT is found)

Conventions: volumes are held in the canonical RAS+ orientation as ``(X, Y, Z)`` arrays
(``X`` toward the patient's right, ``Y`` anterior, ``Z`` superior); an axial slice is
``vol[:, :, z]``; the cache stores slices as ``(Z, S, S)``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import errno
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

with warnings.catch_warnings():  # without ipywidgets tqdm.auto falls back to text bars; that is fine
    warnings.simplefilter("ignore")
    from tqdm.auto import tqdm
try:  # optional: faster .nii.gz decompression
    from isal import igzip as _igzip
except ImportError:  # pragma: no cover - depends on the environment
    _igzip = None

DEFAULT_HU_WINDOW = (-100.0, 400.0)  # liver soft-tissue window; (-200, 250) is a common alternative
CACHE_VERSION = 3  # bump when the cache format or preprocessing code changes (3: cascade boxes grown to ROI size)


# =============================================================================================
# 0. Environment and settings                                (notebook: "Imports", "Configuration")
# =============================================================================================

def environment(device: torch.device | str | None = None) -> dict:
    """Versions and device facts recorded with every result."""
    import platform
    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "numpy": np.__version__,
           "nibabel": nib.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "device": str(device) if device is not None else str(pick_device())}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    env["precision"] = mixed_precision(env["device"])
    return env


def print_env() -> None:
    """Print Python, torch, CUDA, GPU, nibabel and numpy versions (notebook: "Imports")."""
    for k, v in environment().items():
        print(f"{k:>15}: {v}")


PRESETS: dict[str, dict] = {
    # Kaggle/Colab GPU with the real data: native 256x256 slices, a wider and deeper U-Net
    "full": {"IMAGE_SIZE": 256, "BATCH_SIZE": 32, "EPOCHS": 40, "LR": 1e-3, "BASE_CHANNELS": 32, "DEPTH": 5},
    # laptop CPU or the synthetic set: small slices and a slim U-Net, minutes not hours
    "quick": {"IMAGE_SIZE": 128, "BATCH_SIZE": 16, "EPOCHS": 20, "LR": 2e-3, "BASE_CHANNELS": 16, "DEPTH": 4},
}


RECIPES: dict[str, dict] = {
    # the plain 2D U-Net this project replaces: one slice in, uniform sampling over all slices, no post-processing
    "baseline": {"context": 1, "tumor_share": 0.0, "liver_share": 0.0, "empty_fraction": 1.0,
                 "loss": "dice_ce", "postprocess": False, "cascade": False, "hu_window": (-100.0, 400.0),
                 "lesion_augment": False, "lesion_balance": False, "stage2_window_fraction": None,
                 "stage1_share": None, "min_tumor_ml": 0.0, "stage2_mirror": False, "average_liver": False},
    # the liver-box cascade: stage 1 (below the CT's size) finds the liver; stage 2 segments the liver box at native
    # pixels with the rest of the budget, on mirrored random windows 0.4 of the box wide, and is averaged over
    # mirrored boxes at inference; in the box, liver or not from both stages' probabilities averaged. 3 adjacent
    # slices in (2.5D); a third of each batch from tumour slices, balanced over lesion contrast, which the
    # augmentation also varies; fewer empty slices; post-processing keeps the largest liver component and makes
    # tumour specks under 0.1 mL liver. Each choice and its evidence: BENCHMARKS.md
    "default": {"context": 3, "tumor_share": 0.33, "liver_share": 0.17, "empty_fraction": 0.2,
                "loss": "dice_ce", "postprocess": True, "cascade": True, "hu_window": (-100.0, 400.0),
                "lesion_augment": True, "lesion_balance": True, "stage2_window_fraction": 0.4,
                "stage1_share": 0.2, "min_tumor_ml": 0.1, "stage2_mirror": True, "average_liver": True},
}


def recipe(name: str) -> dict:
    """The settings of a named recipe ('baseline' or 'default'); a copy you may change."""
    if name not in RECIPES:
        raise ValueError(f"RECIPE must be one of {sorted(RECIPES)}, got {name!r}")
    return dict(RECIPES[name])


def pick_device(preference: str = "auto") -> torch.device:
    """'auto' -> CUDA (when this torch build has kernels for the GPU), then Apple MPS, then CPU; or the named device.

    Raises:
        RuntimeError: ``preference`` names CUDA but this torch build has no kernels for the GPU's architecture
            (e.g. a P100 on a current Kaggle image): it says what to choose instead.
    """
    if preference != "auto":
        device = torch.device(preference)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"DEVICE = {preference!r}, but this machine or torch build has no CUDA GPU: choose "
                               "'auto' or 'cpu'")
        reason = cuda_unsupported_reason(device.index or 0) if device.type == "cuda" else ""
        if reason:
            raise RuntimeError(reason)
        return device
    if torch.cuda.is_available():
        reason = cuda_unsupported_reason()
        if not reason:
            return torch.device("cuda")
        warnings.warn(reason + " DEVICE = 'auto' falls back to the CPU.", stacklevel=2)
        print("WARNING:", reason, "DEVICE = 'auto' falls back to the CPU (slow).")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cuda_unsupported_reason(index: int = 0) -> str:
    """Why this torch build cannot run on CUDA GPU ``index`` (no kernels for its architecture), or "" when it can.

    Recent torch wheels carry no ``sm_60`` kernels, so on a P100 the first CUDA operation fails with "no kernel
    image is available". A GPU runs when its architecture, or an older one of the same major version, is in
    ``torch.cuda.get_arch_list()`` (binary compatibility within a major version), or when PTX for an older
    architecture is there for the driver to compile.
    """
    if not torch.cuda.is_available():
        return ""
    major, minor = torch.cuda.get_device_capability(index)
    archs = torch.cuda.get_arch_list()
    if not archs:  # a build that does not say (some source builds): assume it runs
        return ""
    sm = [(int(a[3:-1]), int(a[-1])) for a in archs if a.startswith("sm_") and a[3:].isdigit()]
    ptx = [(int(a[8:-1]), int(a[-1])) for a in archs if a.startswith("compute_") and a[8:].isdigit()]
    if any(M == major and m <= minor for M, m in sm) or any((M, m) <= (major, minor) for M, m in ptx):
        return ""
    name = torch.cuda.get_device_name(index)
    return (f"This torch {torch.__version__} has no CUDA kernels for the {name} (compute capability "
            f"{major}.{minor}; the build has {' '.join(archs)}). On Kaggle choose the accelerator 'GPU T4 x 2' "
            "(or install a torch build for this GPU); or set DEVICE = 'cpu'.")


def set_determinism(seed: int, deterministic: bool | None = None) -> bool:
    """Seed Python, NumPy and torch; choose deterministic kernels or fast ones. Returns which was chosen.

    Args:
        seed: the one seed.
        deterministic: None = deterministic on the CPU (same seed, same run) and fast on CUDA, where
            deterministic kernels cost speed and bilinear upsampling's backward is not deterministic
            anyway; there cuDNN benchmarking picks the fastest convolution for the fixed slice shape.
    """
    import random
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic is None:
        deterministic = not torch.cuda.is_available()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if torch.cuda.is_available():
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = not deterministic
    return deterministic


def resolve_settings(settings: dict, device: torch.device, synthetic: bool,
                     native_shape: Sequence[int] | None = None) -> tuple[dict, list[str]]:
    """Fill settings left at None from the preset and the recipe (notebook: "Configuration").

    The preset is "full" on a CUDA GPU with real data, else "quick"; ``CONTEXT_SLICES``,
    ``CASCADE``, ``HU_WINDOW``, ``LOSS``, stage 2's ``PATCH_SIZE`` (the recipe's ``stage2_window_fraction`` of
    ``ROI_SIZE``) and the sampling, augmentation and post-processing options
    come from ``RECIPE`` (``RECIPE_SETTINGS`` holds them with your overrides). The recipe's cascade runs where
    ``IMAGE_SIZE`` is below the CT's in-plane size (where stage 2 gains resolution); where the preset's
    ``IMAGE_SIZE`` is not, stage 1 trains at half the CT's size (:func:`_stage1_below_native`), and where yours is
    not, the cascade is off. With the cascade, ``ROI_SIZE`` comes from ``native_shape`` (the CT's voxels per slice,
    :func:`roi_size_for`).

    Returns:
        (completed settings, lines saying what was chosen and why).
    """
    s = dict(settings)
    notes = _resolve_preset(s, device, synthetic)
    rec = recipe(s["RECIPE"])
    if s.get("CASCADE") is not False and settings.get("IMAGE_SIZE") is None:
        below = _stage1_below_native(s, native_shape, rec, forced=s.get("CASCADE") is True)
        notes = [n for n in notes if not (below and n.startswith("IMAGE_SIZE = "))] + below
    notes += _resolve_from_recipe(s, rec, native_shape)
    if s.get("EVAL_CHECKPOINT", "last") not in ("last", "best"):
        raise ValueError(f"EVAL_CHECKPOINT must be 'last' or 'best', got {s['EVAL_CHECKPOINT']!r}")
    check_fold(s.get("FOLD"))
    s["GPUS"], gpu_note = resolve_gpus(s.get("GPUS"), device, s["BATCH_SIZE"])
    notes.append(gpu_note)
    notes += _resolve_cascade(s, native_shape, rec) if s["CASCADE"] else []
    if s.get("PATCH_SIZE") and not s["CASCADE"]:
        notes.append(f"PATCH_SIZE = None (yours, {s['PATCH_SIZE']}, is unused: no stage 2 without the cascade)")
    s["PATCH_SIZE"] = (s.get("PATCH_SIZE") or None) if s["CASCADE"] else None  # None: whole boxes, or no stage 2
    rec.update(context=s["CONTEXT_SLICES"], cascade=bool(s["CASCADE"]),
               stage2_window_fraction=round(s["PATCH_SIZE"] / s["ROI_SIZE"], 3) if s["PATCH_SIZE"] else None,
               stage1_share=rec["stage1_share"] if s["CASCADE"] else None,
               stage2_mirror=bool(rec["stage2_mirror"] and s["CASCADE"]),
               average_liver=bool(rec.get("average_liver") and s["CASCADE"]))
    s["RECIPE_SETTINGS"] = rec
    return s, notes


def _resolve_preset(s: dict, device: torch.device, synthetic: bool) -> list[str]:
    """:func:`resolve_settings`' preset: "full" on a CUDA GPU with real data, else "quick" (unless set); its values
    fill the settings left at None (in place). Returns the notes."""
    preset = s.get("PRESET") or ("full" if device.type == "cuda" and not synthetic else "quick")
    if preset not in PRESETS:
        raise ValueError(f"PRESET must be one of {sorted(PRESETS)} or None, got {preset!r}")
    why = "CUDA GPU and real data" if preset == "full" and not s.get("PRESET") else (
        "set by you" if s.get("PRESET") else ("synthetic data" if synthetic else f"no CUDA GPU ({device.type})"))
    notes = [f"PRESET = {preset!r} ({why})"]
    s["PRESET"] = preset
    for key, value in PRESETS[preset].items():
        if s.get(key) is None:
            s[key] = value
            notes.append(f"{key} = {value!r} (preset)")
    return notes


def _resolve_from_recipe(s: dict, rec: dict, native_shape: Sequence[int] | None) -> list[str]:
    """:func:`resolve_settings`' recipe part: ``CONTEXT_SLICES``, ``CASCADE``, ``HU_WINDOW`` and ``LOSS`` left at None
    come from ``rec``; yours are written into ``rec`` (both in place). Returns the notes."""
    notes = []
    if s.get("CONTEXT_SLICES") is None:
        s["CONTEXT_SLICES"] = rec["context"]
        notes.append(f"CONTEXT_SLICES = {rec['context']} (recipe {s['RECIPE']!r})")
    if s.get("CASCADE") is None:
        gains = native_shape is None or s["IMAGE_SIZE"] < max(native_shape[:2])  # stage 2 sees finer pixels
        s["CASCADE"] = bool(rec["cascade"] and gains)
        notes.append(f"CASCADE = {s['CASCADE']} (recipe {s['RECIPE']!r}" + ("" if gains or not rec["cascade"] else
                     f"; off: IMAGE_SIZE {s['IMAGE_SIZE']} is not below the CT's {max(native_shape[:2])} voxels "
                     "in-plane, so stage 2 would gain no resolution") + ")")
    if s.get("HU_WINDOW") is None:
        s["HU_WINDOW"] = tuple(rec["hu_window"])
        notes.append(f"HU_WINDOW = {s['HU_WINDOW']} (recipe {s['RECIPE']!r})")
    rec["hu_window"] = tuple(s["HU_WINDOW"])
    if s.get("LOSS") is None:
        s["LOSS"] = rec["loss"]
        notes.append(f"LOSS = {rec['loss']!r} (recipe {s['RECIPE']!r})")
    elif s["LOSS"] not in LOSSES:
        raise ValueError(f"LOSS must be one of {sorted(LOSSES)} or None, got {s['LOSS']!r}")
    rec["loss"] = s["LOSS"]
    return notes


def _stage1_below_native(s: dict, native_shape: Sequence[int] | None, rec: dict, forced: bool = False) -> list[str]:
    """A cascade recipe on CT whose slices are no larger than the preset's ``IMAGE_SIZE`` (the Kaggle set's 256²
    under the full preset): stage 1 at half the CT's in-plane size (rounded to the U-Net's 2^depth), so that stage 2
    still sees the liver box at finer pixels. At that scale the cascade with stage 1 at 128² beat one stage at native
    256² (BENCHMARKS.md). ``forced``: ``CASCADE = True`` set by you, whatever the recipe. Changes ``IMAGE_SIZE``
    in place; the note says why."""
    native = max(native_shape[:2]) if native_shape else None
    if not ((rec["cascade"] or forced) and native and s["IMAGE_SIZE"] >= native):
        return []
    multiple = 2 ** s["DEPTH"]
    s["IMAGE_SIZE"] = max(multiple, native // 2 // multiple * multiple)
    return [f"IMAGE_SIZE = {s['IMAGE_SIZE']} (recipe {s['RECIPE']!r}: stage 1 of the cascade at half the CT's "
            f"{native} voxels in-plane, stage 2 on the liver box at native pixels: it beat one stage at native "
            "size, BENCHMARKS.md)"]


def _resolve_cascade(s: dict, native_shape: Sequence[int] | None, rec: dict) -> list[str]:
    """The cascade's part of :func:`resolve_settings`: ``ROI_SIZE`` and ``PATCH_SIZE`` when None (in place, the
    latter from the recipe's ``stage2_window_fraction``), and the epoch split."""
    notes = []
    if s.get("ROI_SIZE") is None:
        s["ROI_SIZE"] = roi_size_for(native_shape) if native_shape else s["IMAGE_SIZE"]
        notes.append(f"ROI_SIZE = {s['ROI_SIZE']} (0.6 of the CT's in-plane size: the liver box at native "
                     "resolution)")
    if s.get("PATCH_SIZE") is None:
        frac = rec.get("stage2_window_fraction")
        s["PATCH_SIZE"] = patch_size_for(s["ROI_SIZE"], frac, 2 ** s["DEPTH"]) if frac else None
        notes.append(f"PATCH_SIZE = {s['PATCH_SIZE']} (recipe {s['RECIPE']!r}: " + (
            f"stage 2 trains on random windows {frac} of ROI_SIZE wide, half centred on tumour)" if frac
            else "stage 2 trains on whole liver boxes)"))
    elif not s["PATCH_SIZE"]:
        notes.append("PATCH_SIZE = 0 (yours: stage 2 trains on whole liver boxes)")
    s["CASCADE_CORE_MM"] = CASCADE_CORE_MM
    notes.append(f"CASCADE_CORE_MM = {CASCADE_CORE_MM} (stage 1's liver this far inside its edge stays liver where "
                 "stage 2 calls background)")
    if rec.get("stage1_share") is None:  # a recipe without a split: a third
        rec["stage1_share"] = CASCADE_STAGE1_SHARE
    e1, e2 = cascade_epochs(s["EPOCHS"], rec["stage1_share"])
    notes.append(f"cascade: stage 1 (liver box) trains {e1} epochs, stage 2 (liver box at native resolution) "
                 f"{e2} (same budget as {s['EPOCHS']}; recipe {s['RECIPE']!r}: stage 1 {rec['stage1_share']:.2g} "
                 f"of it, and at least {CASCADE_MIN_STAGE1_STEPS} steps: checked in 'Train')")
    return notes


def patch_size_for(roi_size: int, fraction: float, multiple: int) -> int:
    """Side of stage 2's training windows: ``fraction`` of ``roi_size``, rounded to a multiple of ``multiple`` (the
    U-Net's 2^depth), at least one multiple and at most ``roi_size`` (160 × 0.4 -> 64; 320 × 0.4 -> 128)."""
    return int(min(roi_size, max(multiple, round(roi_size * fraction / multiple) * multiple)))


def patch_steps(steps: int, roi_size: int, patch_size: int | None) -> int:
    """Steps that show as many pixels on ``patch_size`` windows as ``steps`` do on whole ``roi_size`` slices:
    a stage-2 epoch on windows costs what an epoch on whole liver boxes does, so the budget stays the same."""
    return steps if not patch_size else int(math.ceil(steps * (roi_size / patch_size) ** 2))


def resolve_gpus(gpus: int | None, device: torch.device, batch_size: int,
                 visible: int | None = None) -> tuple[int, str]:
    """How many GPUs train (``GPUS``): None = one (as nnU-Net and the MONAI tutorials do), or the number you set.

    With several GPUs visible (Kaggle's *GPU T4 x 2*) the note says how to use them: ``GPUS = 2`` trains with
    DistributedDataParallel (:func:`train_replicated`), one process per GPU. That path is tested with processes
    on a CPU and on one GPU, not yet timed on two real GPUs, so it is not the default.

    Returns:
        (number, a line saying why).
    """
    if device.type != "cuda":
        if gpus not in (None, 1):
            raise ValueError(f"GPUS = {gpus} needs CUDA GPUs; this run uses {device.type}. Set GPUS = None or 1.")
        return 1, f"GPUS = 1 ({device.type})"
    visible = torch.cuda.device_count() if visible is None else visible
    if gpus is None:
        if visible < 2:
            return 1, "GPUS = 1 (one CUDA GPU visible)"
        return 1, (f"GPUS = 1 (default; {visible} GPUs are visible: GPUS = {visible} trains on all of them with "
                   "DistributedDataParallel, each taking BATCH_SIZE / GPUS slices a step; expected a little over "
                   f"1/{visible} of the epoch time, not yet measured on real GPUs)")
    n = int(gpus)
    if not 1 <= n <= visible:
        raise ValueError(f"GPUS = {gpus}, but {visible} CUDA GPU(s) are visible.")
    if n > 1 and batch_size % n:
        raise ValueError(f"BATCH_SIZE {batch_size} does not split evenly over {n} GPUs; use a multiple of {n}.")
    how = "; one process per GPU, DistributedDataParallel, each takes BATCH_SIZE / GPUS slices a step" if n > 1 else ""
    return n, f"GPUS = {n} (set by you{how})"


N_FOLDS = 5  # cross-validation folds (FOLD 0-4), as nnU-Net


def check_fold(fold: Any) -> None:
    """Raise unless ``fold`` is None or an integer 0..N_FOLDS-1."""
    if fold is not None and (isinstance(fold, bool) or not isinstance(fold, (int, np.integer))
                             or not 0 <= fold < N_FOLDS):
        raise ValueError(f"FOLD must be None or an integer 0-{N_FOLDS - 1} ({N_FOLDS}-fold cross-validation), "
                         f"got {fold!r}")


def run_dir(output_dir: str | os.PathLike, fold: int | None = None) -> Path:
    """Where a run writes checkpoints, figures and metrics: ``output_dir``, or ``output_dir/fold_k`` for a fold."""
    check_fold(fold)
    return Path(output_dir) / (f"fold_{fold}" if fold is not None else "")


# =============================================================================================
# 1. I/O: find and load NIfTI cases                               (notebook: "Data", "Look")
# =============================================================================================

class CTDataError(ValueError):
    """Raised for input data that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class CaseFiles:
    """One case on disk: its id, image path and label path (``None`` = unlabelled)."""

    case_id: str
    image: Path
    label: Path | None = None


_NIFTI_RE = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$", re.IGNORECASE)
_IMAGE_DIRS = {"images", "imagestr", "imagests", "volumes", "image"}
_LABEL_DIRS = {"labels", "labelstr", "labelsts", "segmentations", "masks", "label"}
_LITS_RE = re.compile(r"^(?P<kind>volume|segmentation)-(?P<num>\d+)$", re.IGNORECASE)
_LAYOUTS_HELP = (
    "  - Kaggle '3D Liver and Liver Tumor Segmentation': images/liver_N.nii + labels/liver_N.nii\n"
    "  - Medical Segmentation Decathlon Task03_Liver: imagesTr/liver_N.nii.gz + labelsTr/liver_N.nii.gz"
    " (+ imagesTs/)\n"
    "  - raw LiTS: volume-N.nii + segmentation-N.nii (flat or in batch sub-folders)\n"
    "  (.nii and .nii.gz alike, searched recursively)"
)


def natural_key(text: str) -> list:
    """Sort key that orders ``liver_2`` before ``liver_10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _role_and_id(path: Path) -> tuple[str, str] | None:
    """Classify a NIfTI path as ('image'|'label', case_id), or None when it is neither."""
    m = _NIFTI_RE.match(path.name)
    if not m:
        return None
    stem = m.group("stem")
    lits = _LITS_RE.match(stem)
    if lits:  # raw LiTS names carry the role themselves
        role = "image" if lits.group("kind").lower() == "volume" else "label"
        return role, f"lits_{int(lits.group('num'))}"
    parent = path.parent.name.lower()
    if parent in _IMAGE_DIRS:
        return "image", stem
    if parent in _LABEL_DIRS:
        return "label", stem
    return None


def find_cases(data_dir: str | os.PathLike, exclude: Sequence[str | os.PathLike] = ()) -> list[CaseFiles]:
    """Find CT cases under ``data_dir`` and pair images with labels by case id.

    Used in the notebook section "Data".  Pairs by case id (never by list position) and returns
    cases in natural order.  Hidden files and macOS ``._*`` files are ignored.

    Args:
        data_dir: folder to search recursively.
        exclude: sub-folders to skip (e.g. ``data/synthetic`` when looking for real data).

    Returns:
        List of :class:`CaseFiles`; ``label`` is ``None`` for unlabelled images (inference only).

    Raises:
        FileNotFoundError: ``data_dir`` does not exist.
        CTDataError: nothing found, a label without an image, or two files for one case.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Data folder {root} does not exist (or is not a folder). "
                                "Set DATA_DIR to the folder that holds the CT volumes.")
    found: dict[str, dict[str, list[Path]]] = {}
    skip = {Path(e).resolve() for e in exclude}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and (Path(dirpath) / d).resolve() not in skip]
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            hit = _role_and_id(path)
            if hit is None:
                continue
            role, case_id = hit
            found.setdefault(case_id, {"image": [], "label": []})[role].append(path)
    if not found:
        raise CTDataError(f"No CT cases found under {root}. Looked for these layouts:\n{_LAYOUTS_HELP}")
    cases = []
    for case_id in sorted(found, key=natural_key):
        images, labels = found[case_id]["image"], found[case_id]["label"]
        for role, paths in (("image", images), ("label", labels)):
            if len(paths) > 1:
                listed = ", ".join(str(p) for p in sorted(paths))
                raise CTDataError(f"Case {case_id!r} has {len(paths)} candidate {role} files: {listed}. "
                                  "Keep one (e.g. remove the duplicate copy or the .nii/.nii.gz twin).")
        if not images:
            raise CTDataError(f"Label {labels[0]} has no matching image for case {case_id!r}. "
                              "Expected an image with the same name in the sibling images folder.")
        cases.append(CaseFiles(case_id, images[0], labels[0] if labels else None))
    return cases


KAGGLE_INPUT = Path("/kaggle/input")


def find_data(data_dir: str | os.PathLike | None = None, local_dir: str | os.PathLike = "data",
              synthetic_dir: str | os.PathLike = "data/synthetic") -> tuple[list[CaseFiles], Path | None]:
    """Locate the cases the notebook trains on (notebook section "Data").

    ``data_dir`` when given (an error if it holds no case); otherwise the Kaggle input mount,
    then ``local_dir`` without its synthetic sub-folder, then ``synthetic_dir``.

    Returns:
        (cases, folder searched), or ([], None) when nothing is found anywhere.
    """
    if data_dir is not None:
        return find_cases(data_dir), Path(data_dir)
    synthetic = Path(synthetic_dir)
    for root, exclude in ((KAGGLE_INPUT, ()), (Path(local_dir), (synthetic,)), (synthetic, ())):
        if root.is_dir():
            try:
                return find_cases(root, exclude=exclude), root
            except CTDataError as exc:
                if not str(exc).startswith("No CT cases found"):
                    raise
    return [], None


def is_synthetic(cases: Sequence[CaseFiles]) -> bool:
    """True when the cases come from :func:`make_synthetic_dataset` (its ``synthetic.json`` is beside them)."""
    return any((Path(c.image).parent.parent / "synthetic.json").exists() for c in cases)


@dataclass
class Case:
    """A loaded case in canonical RAS+ orientation.

    Attributes:
        case_id: case name.
        image: float32 Hounsfield units, shape (X, Y, Z).
        label: uint8 in {0, 1, 2}, same shape, or None.
        affine: 4x4 voxel-to-world affine of the canonical arrays.
        spacing: voxel size in mm (x, y, z).
        source_affine: the file's own grid, to map predictions back.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    spacing: tuple[float, float, float]
    source_affine: np.ndarray


def _open_nifti(path: Path) -> nib.Nifti1Image:
    """Open a NIfTI file, with errors that name the file.

    ``.nii.gz`` files are decompressed with ISA-L (the ``isal`` package, about 2.4x faster than
    zlib) when it is installed, else by nibabel's gzip reader.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        if _igzip is not None and path.name.lower().endswith(".gz"):
            raw = _igzip.decompress(path.read_bytes())
            img = None
            for cls in (nib.Nifti1Image, nib.Nifti2Image):
                try:
                    img = cls.from_bytes(raw)
                    break
                except Exception:  # not this NIfTI version; nib.load below gives the real error
                    continue
            img = img if img is not None else nib.load(str(path))
        else:
            img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for non-NIfTI / truncated files
        raise CTDataError(f"{path}: cannot be read as NIfTI ({type(exc).__name__}: {exc}). "
                          "Is it a complete .nii/.nii.gz file?") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise CTDataError(f"{path}: is a {type(img).__name__}, not a NIfTI image")
    return img


def _read_array(img: nib.Nifti1Image, path: Path) -> tuple[np.ndarray, float, float]:
    """Read the stored voxel data unscaled, squeezing a singleton 4th axis; return (data, slope, inter)."""
    shape = img.shape
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):  # a singleton 4th axis is squeezed below
        raise CTDataError(f"{path}: expected a 3D volume, got shape {shape}"
                          + (" (a 4D series: pick one volume first)" if len(shape) == 4 else ""))
    try:
        proxy = img.dataobj
        if hasattr(proxy, "get_unscaled"):
            data, slope, inter = np.asarray(proxy.get_unscaled()), float(proxy.slope), float(proxy.inter)
        else:  # an in-memory image
            data, slope, inter = np.asanyarray(proxy), 1.0, 0.0
    except Exception as exc:
        raise CTDataError(f"{path}: voxel data cannot be read ({type(exc).__name__}: {exc}); "
                          "the file is probably truncated or corrupt") from exc
    if data.ndim == 4:
        data = data[..., 0]
    return data, slope, inter


def _to_canonical(data: np.ndarray, affine: np.ndarray, dtype: type | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reorient an array to RAS+ (as ``nib.as_closest_canonical`` does), optionally casting in the same pass."""
    ornt = io_orientation(affine)
    new_affine = affine @ inv_ornt_aff(ornt, data.shape)
    view = apply_orientation(data, ornt)  # a flipped/transposed view
    return np.asarray(view, dtype=dtype or view.dtype, order="C"), new_affine


def check_label_values(label: np.ndarray, path: Path | str) -> np.ndarray:
    """Validate a label array (values in {0,1,2}; float must be integral) and return uint8."""
    if label.dtype.kind == "f":
        if not np.all(np.isfinite(label)):
            raise CTDataError(f"{path}: label holds NaN or inf values")
        if not np.all(label == np.round(label)):
            bad = np.unique(label[label != np.round(label)])[:5]
            raise CTDataError(f"{path}: label is float with non-integral values (e.g. {bad.tolist()}); "
                              "a probability map? Threshold it to 0/1/2 first.")
    if label.min() >= 0 and label.max() <= 2:  # the common case, without a slow np.unique
        return label.astype(np.uint8, copy=False)
    values = np.unique(label)
    extra = [v for v in values.tolist() if v not in (0, 1, 2)]
    if extra:
        hint = " A 0/255 mask? Convert with (mask > 0)." if 255 in extra else ""
        raise CTDataError(f"{path}: label values must be 0 background, 1 liver, 2 tumour; "
                          f"found {[int(v) if float(v).is_integer() else v for v in values.tolist()]}.{hint}")
    return label.astype(np.uint8, copy=False)


def check_ct_intensities(image: np.ndarray, path: Path | str) -> None:
    """Raise on NaN/inf; warn when intensities do not look like CT Hounsfield units."""
    if not np.isfinite(image).all():
        raise CTDataError(f"{path}: image holds NaN or inf values")
    sample = image[::4, ::4, ::2] if image.ndim == 3 else image
    lo, hi = np.percentile(sample, [1, 99])
    if hi - lo < 50 or lo > -300 or hi > 5000:
        warnings.warn(f"{path}: intensities (1st-99th percentile {lo:.1f} .. {hi:.1f}) do not look like "
                      "CT Hounsfield units (air ~ -1000, soft tissue 0-100). MR or already-normalised "
                      "data? The HU window will not fit it.", stacklevel=3)


def load_case(image_path: str | os.PathLike, label_path: str | os.PathLike | None = None,
              case_id: str | None = None) -> Case:
    """Load one CT volume (and label) as canonical RAS+ arrays, validating both.

    Used in the notebook sections "Look at one volume" and "Inference".

    Args:
        image_path: CT NIfTI file.
        label_path: label NIfTI file (0 background, 1 liver, 2 tumour) or None.
        case_id: name for the case; defaults to the file name without extension.

    Returns:
        A :class:`Case` with float32 HU image and uint8 label in RAS+ orientation.

    Raises:
        CTDataError: unreadable file, 4D series, shape/affine mismatch, bad label values, NaN/inf.
    """
    image_path = Path(image_path)
    img = _open_nifti(image_path)
    raw, slope, inter = _read_array(img, image_path)
    source_affine = img.affine.copy()
    image, affine = _to_canonical(raw, source_affine, np.float32)  # flip + cast in one pass
    if slope != 1.0:  # header scaling in float32: no float64 copy of the volume
        image *= np.float32(slope)
    if inter != 0.0:
        image += np.float32(inter)
    check_ct_intensities(image, image_path)
    label = None
    if label_path is not None:
        label_path = Path(label_path)
        lab_img = _open_nifti(label_path)
        lab, lslope, linter = _read_array(lab_img, label_path)
        if (lslope, linter) != (1.0, 0.0):
            lab = lab * lslope + linter
        if lab.shape != raw.shape:
            raise CTDataError(f"{label_path}: label shape {lab.shape} differs from image shape {raw.shape} "
                              f"of {image_path}")
        if not np.allclose(lab_img.affine, source_affine, atol=1e-3, rtol=1e-4):
            raise CTDataError(f"{label_path}: label affine differs from the image's ({image_path}); "
                              f"label:\n{np.round(lab_img.affine, 3)}\nimage:\n{np.round(source_affine, 3)}")
        lab = check_label_values(lab, label_path)
        label, _ = _to_canonical(lab, source_affine)
    spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    m = _NIFTI_RE.match(image_path.name)
    name = case_id or (m.group("stem") if m else image_path.stem)
    return Case(name, image, label, affine, spacing, source_affine)


def from_canonical(array: np.ndarray, source_affine: np.ndarray) -> np.ndarray:
    """Map a canonical (RAS+) array back to the grid of the file it came from."""
    ornt = io_orientation(source_affine)
    back = ornt_transform(np.array([[0, 1], [1, 1], [2, 1]]), ornt)
    return np.ascontiguousarray(apply_orientation(array, back))


# =============================================================================================
# 2. Preprocessing: HU window, resize, the slice cache                     (notebook: "Preprocess")
# =============================================================================================

def window_hu(image: np.ndarray, window: Sequence[float] = DEFAULT_HU_WINDOW) -> np.ndarray:
    """Clip HU to ``window`` and scale to [0, 1] (float32).

    The default [-100, 400] keeps fat, soft tissue, contrast-enhanced liver and vessels apart
    and saturates bone and air; [-200, 250] is a common narrower alternative.
    """
    lo, hi = float(window[0]), float(window[1])
    if hi <= lo:
        raise ValueError(f"HU window must be (low, high) with high > low, got {window}")
    out = np.clip(image, lo, hi).astype(np.float32, copy=False)
    out -= lo
    out *= 1.0 / (hi - lo)
    return out


def resize_volume_slices(volume: np.ndarray, size: int, is_label: bool = False) -> np.ndarray:
    """Resize every axial slice of an (X, Y, Z) volume to (size, size); return (Z, size, size).

    Images: area averaging when shrinking (anti-aliased and fast), bilinear when enlarging.
    Labels: nearest neighbour.
    """
    nx, ny, nz = volume.shape
    if is_label:
        ix = np.minimum(((np.arange(size) + 0.5) * nx / size).astype(np.int64), nx - 1)
        iy = np.minimum(((np.arange(size) + 0.5) * ny / size).astype(np.int64), ny - 1)
        return np.ascontiguousarray(volume[ix][:, iy].transpose(2, 0, 1))
    t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None].permute(0, 3, 1, 2)
    # (1, Z, X, Y) in channels-last memory: no transposed copy of the volume is needed
    if (nx, ny) != (size, size):
        if nx >= size and ny >= size:
            t = F.interpolate(t, size=(size, size), mode="area")
        else:
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return t[0].contiguous().numpy()


def network_slices(windowed: np.ndarray, size: int) -> np.ndarray:
    """The one path from a windowed (X, Y, Z) volume to the network's (Z, size, size) float16 slices in [0, 1].

    The slice cache (training), :func:`predict_volume` and the cascade's stage 2 all call it, so
    a volume at inference reaches the network exactly as it did in training.
    """
    return np.clip(resize_volume_slices(windowed, size), 0, 1).astype(np.float16)


def context_indices(n_slices: int, context: int) -> np.ndarray:
    """(n_slices, context) indices of each slice's neighbours, edges replicated (2.5D input)."""
    if context < 1 or context % 2 == 0:
        raise ValueError(f"context must be an odd number >= 1 (1, 3, 5), got {context}")
    half = context // 2
    idx = np.arange(n_slices)[:, None] + np.arange(-half, half + 1)[None, :]
    return np.clip(idx, 0, n_slices - 1)


ROI_MARGIN_MM = 15.0  # cascade: context kept around the liver box on every side
CASCADE_STAGE1_SHARE = 1 / 3  # cascade: stage 1's share of the budget where the recipe names none (stage 2: the rest)
CASCADE_CORE_MM = 2.0  # cascade: stage 1's liver deeper than this in its slice stays liver where stage 2 sees none


def canonical_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """A NIfTI file's shape in canonical RAS+ axis order, from its header alone (no voxels are read)."""
    img = nib.load(str(path))
    ornt = io_orientation(img.affine)
    return tuple(int(img.shape[int(axis)]) for axis in np.argsort(ornt[:, 0]))


def roi_size_for(in_plane: Sequence[int]) -> int:
    """Default side of the cascade's stage-2 box (``ROI_SIZE``): 0.6 of the CT's in-plane size, rounded up to 32,
    in pixels.

    A liver with its margin spans about 200-250 mm, i.e. 0.5-0.6 of a 350-420 mm field of view, so the
    box holds the liver at native resolution (192 -> 128, 256 -> 160, 512 -> 320).
    """
    side = int(max(in_plane[:2]))
    return min(side, int(math.ceil(0.6 * side / 32) * 32))


def cascade_epochs(epochs: int, stage1_share: float = CASCADE_STAGE1_SHARE) -> tuple[int, int]:
    """The cascade's split of a training budget: (stage 1, stage 2) epochs, each at least 1.

    Stage 1 only has to find the liver box, so it can be cheap: the default recipe gives it a fifth
    (``stage1_share``), stage 2 the rest.
    """
    if not 0 < stage1_share < 1:
        raise ValueError(f"the cascade's stage1_share must lie between 0 and 1 (stage 2 trains the rest), got "
                         f"{stage1_share!r}")
    first = max(1, int(round(epochs * stage1_share)))
    return first, max(1, epochs - first)


CASCADE_MIN_STAGE1_STEPS = 240  # cascade: optimizer steps stage 1 gets at least (its real-CT liver still rises to 240)


def cascade_plan(epochs: int, stage1_share: float, steps_per_epoch: int,
                 min_stage1_steps: int = CASCADE_MIN_STAGE1_STEPS, forced: bool = False) -> tuple[int, int, str]:
    """How the cascade splits a budget of ``epochs``: (stage-1 epochs, stage-2 epochs, a line saying why).

    Stage 1 gets its ``stage1_share`` of the epochs (:func:`cascade_epochs`), but at least ``min_stage1_steps``
    optimizer steps: on real CT slices a U-Net's liver Dice rises steeply to about 120 steps and still rises to 240;
    a stage 1 stopped earlier gives stage 2 a box that misses liver, and both stages' liver stays below one
    stage's (BENCHMARKS.md, "Real CT livers"). When that many steps would take more than half the budget, two
    stages do not fit it: the result is (epochs, 0, why), and one stage trains all the epochs.

    Args:
        epochs: the whole budget (``EPOCHS``).
        stage1_share: the recipe's share of it for stage 1.
        steps_per_epoch: stage 1's optimizer steps per epoch.
        min_stage1_steps: the floor.
        forced: you set ``CASCADE = True``: the recipe's split is kept whatever the budget (the line warns).
    """
    first, second = cascade_epochs(epochs, stage1_share)
    steps_per_epoch = max(1, int(steps_per_epoch))
    need = math.ceil(min_stage1_steps / steps_per_epoch)
    if forced and first < need:
        return first, second, (f"cascade (CASCADE = True, set by you): stage 1 trains {first} epochs, only "
                               f"{first * steps_per_epoch} steps (below {min_stage1_steps} it may not find the "
                               f"liver), stage 2 {second}")
    if first >= need:
        return first, second, (f"cascade: stage 1 (liver box) trains {first} epochs ({first * steps_per_epoch} steps), "
                               f"stage 2 (liver box at native resolution) {second}")
    if 2 * need <= epochs:
        return need, epochs - need, (f"cascade: stage 1 trains {need} epochs, more than its share of {first}, so that "
                                     f"it takes at least {min_stage1_steps} steps to find the liver; stage 2 "
                                     f"{epochs - need}")
    return epochs, 0, (f"CASCADE off: the budget ({epochs} epochs of {steps_per_epoch} steps) is too small for two "
                       f"stages (stage 1 needs at least {min_stage1_steps} steps to find the liver, more than half of "
                       f"it); one stage trains all {epochs} epochs. Raise EPOCHS for the cascade.")


def liver_box(mask: np.ndarray, spacing: Sequence[float], margin_mm: float = ROI_MARGIN_MM,
              min_side: int = 0) -> tuple[int, ...] | None:
    """In-plane and z bounding box (x0, x1, y0, y1, z0, z1) of a 3D mask plus a margin in mm; None if empty.

    Used by the two-stage cascade: stage 2 works on this box of the full-resolution slices.
    The in-plane box is made square in mm (so resizing it to the network input keeps the aspect),
    then at least ``min_side`` voxels wide on each side (grown around its centre, within the image):
    a box no larger than ``ROI_SIZE`` reaches the network at native resolution, unresized.
    """
    idx = np.argwhere(mask)
    if not len(idx):
        return None
    lo, hi = idx.min(0), idx.max(0) + 1
    m = [int(math.ceil(margin_mm / s)) for s in spacing]
    lo = [max(0, int(a) - d) for a, d in zip(lo, m)]
    hi = [min(n, int(b) + d) for b, d, n in zip(hi, m, mask.shape)]
    ext = max((hi[0] - lo[0]) * spacing[0], (hi[1] - lo[1]) * spacing[1])  # square side in mm
    for a in (0, 1):
        want = min(mask.shape[a], max(hi[a] - lo[a], int(round(ext / spacing[a])), min_side))
        start = int(round((lo[a] + hi[a] - want) / 2))
        lo[a] = min(max(0, start), mask.shape[a] - want)
        hi[a] = lo[a] + want
    return (lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])


def crop_box(volume: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """``volume[x0:x1, y0:y1, z0:z1]``."""
    x0, x1, y0, y1, z0, z1 = box
    return volume[x0:x1, y0:y1, z0:z1]


@dataclass
class CachedCase:
    """A preprocessed case from the slice cache.

    Attributes:
        case_id: case name.
        image: (Z, S, S) float16 windowed slices in [0, 1], memory-mapped.
        label: (Z, S, S) uint8 resized label, memory-mapped, or None.
        label_crop: the canonical full-resolution label inside its non-zero bounding box
            (``meta["label_box"]``); :attr:`label_full` rebuilds the (X, Y, Z) volume for 3D scoring.
        has_liver, has_tumor: per-slice flags (Z,) from the full-resolution label.
        meta: spacing, shapes, affines and source paths (and ``roi_box`` for the cascade).
        roi_image, roi_label: (Zb, R, R) ground-truth liver box of the full-resolution slices, at least
            R pixels wide and resized to R only when larger (cascade stage 2 training), when
            preprocessed with ``roi_size``.
        from_cache: True when nothing was decoded for this case in this call.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    label_crop: np.ndarray | None
    has_liver: np.ndarray
    has_tumor: np.ndarray
    meta: dict
    from_cache: bool = False
    roi_image: np.ndarray | None = None
    roi_label: np.ndarray | None = None

    @property
    def n_slices(self) -> int:
        """Number of axial slices."""
        return int(self.image.shape[0])

    @property
    def label_full(self) -> np.ndarray | None:
        """(X, Y, Z) uint8 canonical label at full resolution, or None for unlabelled cases."""
        if self.label_crop is None:
            return None
        out = np.zeros(self.meta["shape"], np.uint8)
        x0, x1, y0, y1, z0, z1 = self.meta["label_box"]
        out[x0:x1, y0:y1, z0:z1] = self.label_crop
        return out


def _file_fingerprint(path: Path | None) -> list | None:
    """(absolute path, size, mtime_ns) of a file, for cache keys."""
    if path is None:
        return None
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def cache_key(case: CaseFiles, image_size: int, hu_window: Sequence[float], roi: Sequence[float] | None = None) -> str:
    """Hash of the input files (path, size, mtime) and every preprocessing parameter."""
    payload = {"v": CACHE_VERSION, "image": _file_fingerprint(case.image), "label": _file_fingerprint(case.label),
               "size": int(image_size), "window": [float(hu_window[0]), float(hu_window[1])]}
    if roi is not None:
        payload["roi"] = [int(roi[0]), float(roi[1])]
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


KAGGLE_WORKING = Path("/kaggle/working")  # Kaggle's output folder (20 GB, saved with the notebook)
KAGGLE_TEMP = Path("/kaggle/temp")        # Kaggle's scratch folder on the machine's disk (gone after the session)
COLAB_DRIVE = Path("/content/drive")      # Google Drive mounted in Colab (15 GB free, slow for many small reads)
CACHE_RESERVE_BYTES = 1 << 30             # free space left untouched on the cache's disk


class CacheSpaceError(OSError):
    """The slice cache does not fit the free space of its disk."""


def default_cache_dir(output_dir: str | os.PathLike) -> Path:
    """Where preprocessed slices go when ``CACHE_DIR`` is None: a fast local disk, not a quota'd output folder.

    Kaggle: ``/kaggle/temp/liver_cache`` (the machine's own disk; not counted in ``/kaggle/working``'s 20 GB
    and not saved as notebook output; rebuilt in each new session). Colab with ``OUTPUT_DIR`` on Google
    Drive: ``/content/liver_cache`` (the VM's local disk). Elsewhere ``OUTPUT_DIR/cache``, kept between runs.
    """
    out = Path(output_dir).resolve()
    if KAGGLE_WORKING.is_dir():
        return KAGGLE_TEMP / "liver_cache"
    if out == COLAB_DRIVE or COLAB_DRIVE in out.parents:
        return COLAB_DRIVE.parent / "liver_cache"
    return out / "cache"


def cache_bytes_needed(cases: Sequence[CaseFiles], image_size: int, roi_size: int | None = None) -> tuple[int, int]:
    """Bytes that caching ``cases`` writes, from their headers: (certain, likely).

    ``certain``: the network slices (float16 image + uint8 label, Z x S x S each), which every case writes.
    ``likely`` adds the cascade's liver-box slices (Z x R x R x 3, an upper bound: only slices with liver
    get one) and the full-resolution label of the liver box (at most X x Y x Z bytes, counted at a quarter).
    """
    certain = likely = 0
    for c in cases:
        x, y, z = canonical_shape(c.image)[:3]
        slices = z * image_size * image_size * (3 if c.label else 2)
        certain += slices
        likely += slices + ((z * roi_size * roi_size * 3 if roi_size else 0) + x * y * z // 4 if c.label else 0)
    return certain, likely


def check_cache_space(cache_dir: Path, certain: int, likely: int) -> None:
    """Refuse to start a cache that cannot fit (``certain`` bytes over the free space); warn when it may not.

    Raises:
        CacheSpaceError: naming the folder, the space needed and free, and what to change.
    """
    free = shutil.disk_usage(cache_dir).free - CACHE_RESERVE_BYTES
    gb = 2 ** 30
    if certain > free:
        raise CacheSpaceError(
            f"The slice cache needs at least {certain / gb:.1f} GB (likely {likely / gb:.1f} GB) in {cache_dir}, "
            f"but only {max(free, 0) / gb:.1f} GB are free there (after a {CACHE_RESERVE_BYTES / gb:.0f} GB "
            "reserve). Set CACHE_DIR to a disk with more room (Kaggle: /kaggle/temp; Colab: /content), delete "
            "old cache folders, or lower IMAGE_SIZE.")
    if likely > free:
        warnings.warn(f"The slice cache may need up to {likely / gb:.1f} GB in {cache_dir}; {free / gb:.1f} GB "
                      "are free. If the disk fills, preprocessing stops with a clear error and keeps what it "
                      "finished.", stacklevel=3)


def _entry_source(entry: Path) -> str | None:
    """The image file a finished cache entry was made from (None for folders that are no entry)."""
    try:
        return str(Path(json.loads((entry / "meta.json").read_text())["image_path"]).resolve())
    except (OSError, ValueError, KeyError):
        return None


def remove_stale_entries(cache_dir: Path, cases: Sequence[CaseFiles], keep: Iterable[Path],
                         tmp_age_s: float = 3600.0) -> tuple[list[str], int]:
    """Delete this data's cache entries of earlier settings (or earlier file versions) and old temp folders.

    An entry is stale when it was made from the image file of one of ``cases`` (its ``meta.json`` says
    which) but is not in ``keep``; entries of other files are left alone, even under the same case id
    (another data set may share the folder). Temp folders of interrupted writes older than ``tmp_age_s``
    go too (younger ones may belong to a run in progress). A run with other settings on the same files in
    the same folder loses its entries: give concurrent runs their own ``CACHE_DIR``.

    Returns:
        (names removed, bytes freed).
    """
    sources, keep = {str(Path(c.image).resolve()) for c in cases}, {Path(k).name for k in keep}
    removed, freed = [], 0
    for entry in sorted(Path(cache_dir).iterdir()) if Path(cache_dir).is_dir() else []:
        old_tmp = entry.name.startswith(".tmp-") and time.time() - entry.stat().st_mtime > tmp_age_s
        stale = not entry.name.startswith(".tmp-") and entry.name not in keep and _entry_source(entry) in sources
        if entry.is_dir() and (stale or old_tmp):
            freed += sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed, freed


def _check_cache_dir(cache_dir: Path, data_dirs: Iterable[Path]) -> None:
    """Refuse a cache folder inside a data folder (inputs are read-only, e.g. /kaggle/input)."""
    cache_dir = cache_dir.resolve()
    for d in data_dirs:
        d = d.resolve()
        if cache_dir == d or d in cache_dir.parents:
            raise ValueError(f"Cache folder {cache_dir} lies inside the data folder {d}; "
                             "choose a writable folder outside it (e.g. OUTPUT_DIR/cache).")


def _preprocess_one(case: CaseFiles, out_dir: str, image_size: int, hu_window: tuple,
                    roi: tuple[int, float] | None = None) -> str:
    """Decode one case and write its cache entry atomically (temp folder + rename)."""
    loaded = load_case(case.image, case.label, case.case_id)
    final = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{case.case_id}-", dir=final.parent))
    try:
        windowed = window_hu(loaded.image, hu_window)
        img = network_slices(windowed, image_size)
        np.save(tmp / "image.npy", img)
        meta = {"case_id": case.case_id, "image_path": str(case.image),
                "label_path": str(case.label) if case.label else None,
                "spacing": list(loaded.spacing), "shape": list(loaded.image.shape),
                "affine": loaded.affine.tolist(), "source_affine": loaded.source_affine.tolist(),
                "image_size": image_size, "hu_window": list(hu_window)}
        if loaded.label is not None:
            np.save(tmp / "label.npy", resize_volume_slices(loaded.label, image_size, is_label=True))
            box = []
            for axes in ((1, 2), (0, 2), (0, 1)):  # non-zero extent along x, y, z
                idx = np.flatnonzero(loaded.label.any(axis=axes))
                box += [int(idx[0]), int(idx[-1]) + 1] if len(idx) else [0, 0]
            meta["label_box"] = box
            np.save(tmp / "label_crop.npy", crop_box(loaded.label, meta["label_box"]))  # small: liver box only
            meta["has_liver"] = (loaded.label >= 1).any(axis=(0, 1)).tolist()
            meta["has_tumor"] = (loaded.label == 2).any(axis=(0, 1)).tolist()
            box = liver_box(loaded.label >= 1, loaded.spacing, roi[1], min_side=roi[0]) if roi else None
            if box is not None:
                np.save(tmp / "roi_image.npy", network_slices(crop_box(windowed, box), roi[0]))
                np.save(tmp / "roi_label.npy", resize_volume_slices(crop_box(loaded.label, box), roi[0], True))
                meta["roi_box"] = [int(b) for b in box]
        else:
            meta["has_liver"] = meta["has_tumor"] = [False] * img.shape[0]
        (tmp / "meta.json").write_text(json.dumps(meta))
        if final.exists():  # a concurrent run finished first; its entry is equivalent
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return case.case_id


def _open_entry(entry: Path, from_cache: bool) -> CachedCase:
    """Memory-map one finished cache entry."""
    meta = json.loads((entry / "meta.json").read_text())
    meta["entry"] = str(entry)
    has_label = (entry / "label.npy").exists()
    return CachedCase(
        meta["case_id"], np.load(entry / "image.npy", mmap_mode="r"),
        np.load(entry / "label.npy", mmap_mode="r") if has_label else None,
        np.load(entry / "label_crop.npy", mmap_mode="r") if has_label else None,
        np.asarray(meta["has_liver"], bool), np.asarray(meta["has_tumor"], bool), meta, from_cache,
        np.load(entry / "roi_image.npy", mmap_mode="r") if (entry / "roi_image.npy").exists() else None,
        np.load(entry / "roi_label.npy", mmap_mode="r") if (entry / "roi_label.npy").exists() else None)


def preprocess_dataset(cases: Sequence[CaseFiles], cache_dir: str | os.PathLike, image_size: int = 256,
                       hu_window: Sequence[float] = DEFAULT_HU_WINDOW, workers: int | None = None,
                       progress: bool = True, roi_size: int | None = None,
                       roi_margin_mm: float = ROI_MARGIN_MM, clean: bool = False) -> list[CachedCase]:
    """Window, resize and cache every case once; later calls only memory-map the cache.

    Used in the notebook section "Preprocess".  Each case is keyed by a hash of its input files
    (path, size, mtime) and of every preprocessing parameter, so changing a parameter or
    touching a file re-decodes exactly what it should.  Entries are written to a temporary
    folder and renamed into place, so an interrupted run never leaves an entry a later run trusts.

    Args:
        cases: from :func:`find_cases`.
        cache_dir: writable folder outside the data folder.
        image_size: in-plane size S of the cached slices.
        hu_window: (low, high) HU window.
        workers: decoding processes; None = up to 4 when several cases need decoding.
        progress: show a tqdm bar over volumes.
        roi_size: also cache each labelled case's liver box (ground truth + ``roi_margin_mm``, at least
            ``roi_size`` pixels wide) from the full-resolution slices, resized to ``roi_size`` only where
            the box is larger (training data of the cascade's stage 2).
        clean: first remove these cases' entries of earlier settings (:func:`remove_stale_entries`) and
            say so; the notebook does, scripts that switch settings back and forth (the studies) do not.

    Returns:
        One :class:`CachedCase` per input case, in input order.
    """
    cache_dir = Path(cache_dir)
    _check_cache_dir(cache_dir, {Path(c.image).parent for c in cases}
                     | {Path(c.label).parent for c in cases if c.label})
    cache_dir.mkdir(parents=True, exist_ok=True)
    hu_window = (float(hu_window[0]), float(hu_window[1]))
    roi = (int(roi_size), float(roi_margin_mm)) if roi_size else None
    entries = [cache_dir / f"{c.case_id}-{cache_key(c, image_size, hu_window, roi)}" for c in cases]
    todo = [(c, e) for c, e in zip(cases, entries) if not (e / "meta.json").exists()]
    removed, freed = remove_stale_entries(cache_dir, cases, entries) if clean else ([], 0)
    if removed and progress:
        print(f"cache: removed {len(removed)} stale entries of earlier settings from {cache_dir} "
              f"({freed / 2**30:.2f} GB freed): {', '.join(removed[:4])}{' ...' if len(removed) > 4 else ''}")
    if todo:
        check_cache_space(cache_dir, *cache_bytes_needed([c for c, _ in todo], image_size, roi[0] if roi else None))
    if workers is None:
        workers = min(4, os.cpu_count() or 1) if len(todo) >= 4 else 0
    _decode_into_cache(cache_dir, todo, image_size, hu_window, roi, workers, progress)
    done = {e for _, e in todo}
    return [_open_entry(e, from_cache=e not in done) for e in entries]


def _decode_into_cache(cache_dir: Path, todo: list, image_size: int, hu_window: tuple[float, float],
                       roi: tuple | None, workers: int, progress: bool) -> None:
    """Decode the ``todo`` (case, entry) pairs into the cache, in ``workers`` processes when > 1, with a progress
    bar; a full disk raises :class:`CacheSpaceError` saying where to put the cache instead (finished entries are
    kept)."""
    bar = tqdm(total=len(todo), desc="preprocess volumes", unit="vol", disable=not progress or not todo)
    args = [(c, str(e), image_size, hu_window, roi) for c, e in todo]
    try:
        if workers > 1:
            import multiprocessing as mp
            # fork on Linux, as torch's DataLoader does, each worker single-threaded; spawn elsewhere
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=torch.set_num_threads,
                                     initargs=(1,)) as pool:
                futures = [pool.submit(_preprocess_one, *a) for a in args]
                try:
                    for fut in futures:
                        fut.result()
                        bar.update()
                except BaseException:  # e.g. a full disk: stop at once rather than decode every other case first
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
        else:
            for a in args:
                _preprocess_one(*a)
                bar.update()
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise CacheSpaceError(f"The disk of the slice cache {cache_dir} is full ({err}). Finished entries are kept "
                              "and reused; set CACHE_DIR to a disk with more room (Kaggle: /kaggle/temp; Colab: "
                              "/content) or lower IMAGE_SIZE, then run again.") from err
    finally:
        bar.close()


def roi_cases(cases: Sequence[CachedCase]) -> list[CachedCase]:
    """The cascade's stage-2 view of cached cases: their liver-box slices as cases of their own."""
    out = []
    for c in cases:
        if c.roi_image is None:
            continue
        lab = np.asarray(c.roi_label)
        out.append(CachedCase(c.case_id, c.roi_image, c.roi_label, None, (lab >= 1).any(axis=(1, 2)),
                              (lab == 2).any(axis=(1, 2)), {**c.meta, "view": "roi"}, c.from_cache))
    if not out:
        raise ValueError("No liver boxes in these cached cases: preprocess with roi_size=... (and labels)")
    return out


# =============================================================================================
# 3. Data sets: split, slice selection, on-device batches, augmentation    (notebook: "Preprocess")
# =============================================================================================

def hash_seed(*parts: int) -> int:
    """A stable 32-bit seed from several integers (independent streams per case)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def class_statistics(labels: Iterable[np.ndarray]) -> dict:
    """Share of voxels and of axial slices per class; tumour share of the liver (cases with tumour)."""
    vox = np.zeros(3)
    slices = np.zeros(3)
    n_slices = 0
    burdens = []
    for lab in labels:
        vox += np.bincount(lab.ravel(), minlength=3)[:3]
        per_slice = [(lab >= 1).any(axis=(0, 1)), (lab == 2).any(axis=(0, 1))]
        slices[1] += per_slice[0].sum()
        slices[2] += per_slice[1].sum()
        n_slices += lab.shape[2]
        if (lab == 2).any():
            burdens.append((lab == 2).sum() / max((lab >= 1).sum(), 1))
    total = vox.sum()
    return {"voxel_share": {"background": vox[0] / total, "liver": vox[1] / total, "tumor": vox[2] / total},
            "slice_share_liver": slices[1] / n_slices, "slice_share_tumor": slices[2] / n_slices,
            "tumor_share_of_liver_median": float(np.median(burdens)) if burdens else 0.0,
            "tumor_share_of_liver_range": [float(np.min(burdens)), float(np.max(burdens))] if burdens else [0.0, 0.0]}


def _strata(units: dict[str, bool], seed: int) -> list[list[str]]:
    """Patients with tumour, then those without, each list shuffled by ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for stratum in (True, False):
        members = sorted((u for u, t in units.items() if t == stratum), key=natural_key)
        out.append([members[i] for i in rng.permutation(len(members))])
    return out


def _stratified_sample(units: dict[str, bool], n_val: int, seed: int) -> set[str]:
    """``n_val`` patients, each stratum in proportion (largest remainder; every non-empty stratum gets one)."""
    strata = [s for s in _strata(units, seed) if s]
    quota = [n_val * len(s) / len(units) for s in strata]
    take = [max(1 if n_val >= len(strata) else 0, int(q)) for q in quota]
    by_remainder = sorted(range(len(strata)), key=lambda k: int(quota[k]) - quota[k])
    for k in by_remainder:  # hand out what is left, largest remainder first
        if sum(take) < n_val and take[k] < len(strata[k]):
            take[k] += 1
    while sum(take) > n_val:  # the "at least one" rule overshot: trim the largest stratum
        take[int(np.argmax(take))] -= 1
    return {u for s, k in zip(strata, take) for u in s[:k]}


def split_cases(case_ids: Sequence[str], val_fraction: float = 0.2, seed: int = 0,
                has_tumor: Mapping[str, bool] | None = None, groups: Mapping[str, str] | None = None,
                fold: int | None = None) -> tuple[list, list]:
    """Patient-level train/validation split, stratified by tumour presence, deterministic by seed.

    A patient's slices are never in both parts (splitting slices at random leaks neighbouring,
    nearly identical slices into validation and inflates Dice).  Patients with and without tumour
    are dealt separately, so a small validation part is not tumour-free by chance.

    Args:
        case_ids: the labelled cases.
        val_fraction: share of patients in validation (single split, ``fold=None``).
        seed: shuffles the patients.
        has_tumor: {case_id: does its label contain tumour?}; None: no stratification.
        groups: {case_id: patient id}; None: one patient per case (as in LiTS).
        fold: None for the single split; 0-4 for that fold of a 5-fold cross-validation (as nnU-Net): patients
            with tumour, then those without, dealt round-robin, so fold sizes differ by at most one.

    Returns:
        (train_ids, val_ids), each in natural order.  Warns below 5 validation cases.
    """
    if not all(isinstance(m, Mapping) for m in (has_tumor, groups) if m is not None):
        raise TypeError("split_cases: pass has_tumor and groups as dicts {case_id: value}")
    patient = groups or {i: i for i in case_ids}
    ids = sorted(case_ids, key=natural_key)
    if len(ids) < 2:
        raise ValueError(f"Need at least 2 labelled cases to split, got {len(ids)}")
    units: dict[str, bool] = {}
    for i in ids:
        units[patient[i]] = units.get(patient[i], False) or bool(has_tumor and has_tumor[i])
    if len(units) < 2:
        raise ValueError("Need at least 2 patients (groups) to split")
    if fold is None:
        n_val = min(len(units) - 1, max(1, int(round(len(units) * val_fraction))))
        val_units = _stratified_sample(units, n_val, seed)
    else:
        check_fold(fold)
        if N_FOLDS > len(units):
            raise ValueError(f"{N_FOLDS} folds need at least {N_FOLDS} patients, got {len(units)}")
        val_units = set([u for s in _strata(units, seed) for u in s][fold::N_FOLDS])
    val = [i for i in ids if patient[i] in val_units]
    if len(val) < 5:
        warnings.warn(f"only {len(val)} validation cases: per-case means and their intervals are very noisy",
                      UserWarning, stacklevel=2)
    return [i for i in ids if patient[i] not in val_units], val


def select_slices(cases: Sequence[CachedCase], empty_fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """Global slice indices to train on: every slice with liver plus a share of those without.

    Args:
        cases: cached cases in the order a :class:`SliceSet` concatenates them.
        empty_fraction: share of liver-free slices to keep (the model must learn "no liver here").
        seed: which liver-free slices are kept.
    """
    rng = np.random.default_rng(seed)
    keep, offset = [], 0
    for c in cases:
        liver = np.flatnonzero(c.has_liver)
        empty = np.flatnonzero(~c.has_liver)
        n_empty = int(round(len(empty) * empty_fraction))
        chosen = np.sort(np.concatenate([liver, rng.choice(empty, n_empty, replace=False)]))
        keep.append(chosen + offset)
        offset += c.n_slices
    return np.concatenate(keep).astype(np.int64) if keep else np.zeros(0, np.int64)


def available_ram(meminfo: str | os.PathLike = "/proc/meminfo") -> int:
    """Bytes of memory available to a new allocation now, or 0 when unknown.

    On Linux the kernel's own estimate, ``MemAvailable`` (free pages plus the page cache it can drop):
    right after preprocessing writes gigabytes, free pages alone would understate it and push training
    to the slower memory-mapped path. Elsewhere free physical pages.
    """
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


class SliceSet:
    """The slices of some cached cases, gathered by index into 2.5D batches.

    Used in the notebook sections "Preprocess" and "Train".  Resident mode keeps the whole set as
    one float16 tensor on ``device`` (the GPU when it fits) and gathers batches by index, which
    removes the DataLoader bottleneck of a 4-core Kaggle machine.  Lazy mode reads each batch
    from the memory-mapped cache, so a data set larger than RAM still trains.

    Args:
        cases: cached cases (with labels).
        context: number of adjacent slices given as channels (1, 3 or 5).
        device: where resident tensors live.
        resident: True / False, or None = resident when the slices take under half the free RAM
            (or are meant for a GPU).
    """

    def __init__(self, cases: Sequence[CachedCase], context: int = 1, device: str | torch.device = "cpu",
                 resident: bool | None = None):
        if not cases:
            raise ValueError("SliceSet needs at least one case")
        self.cases, self.context, self.device = list(cases), context, torch.device(device)
        counts = [c.n_slices for c in cases]
        self.offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.case_of = np.repeat(np.arange(len(cases)), counts)
        self.neighbours_np = np.concatenate([context_indices(n, context) + o for n, o in zip(counts, self.offsets)])
        self.has_liver = np.concatenate([c.has_liver for c in cases])
        self.has_tumor = np.concatenate([c.has_tumor for c in cases])
        size = cases[0].image.shape[1:]
        n_bytes = sum(counts) * int(np.prod(size)) * 3  # float16 image + uint8 label
        ram = available_ram()
        self.resident = resident if resident is not None else (
            self.device.type != "cpu" or not ram or n_bytes < ram // 2)
        if not self.resident:
            return
        self.images = torch.empty((sum(counts), *size), dtype=torch.float16, device=self.device)
        self.labels = torch.empty((sum(counts), *size), dtype=torch.uint8, device=self.device)
        with warnings.catch_warnings():  # memmaps are read-only; they are only copied from here
            warnings.simplefilter("ignore", UserWarning)
            for c, o in zip(cases, self.offsets):
                self.images[o:o + c.n_slices] = torch.from_numpy(np.asarray(c.image))
                self.labels[o:o + c.n_slices] = torch.from_numpy(np.asarray(c.label))
        self.neighbours = torch.from_numpy(self.neighbours_np).to(self.device)

    def __len__(self) -> int:
        return len(self.case_of)

    def batch(self, index: torch.Tensor | np.ndarray,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather slices ``index`` as (B, context, S, S) float32 inputs and (B, S, S) long labels on ``device``.

        Slices travel as float16/uint8 and are converted on the target device (half the transfer).
        Slices held on the CPU go to a GPU from pinned memory (:meth:`host_batch`), so the copy is
        asynchronous.
        """
        device = torch.device(device) if device is not None else self.device
        if self.resident and self.device.type != "cpu":
            index = torch.as_tensor(index, device=self.device)
            x, y = self.images[self.neighbours[index]], self.labels[index]
        else:
            x, y = self.host_batch(index, pin=device.type == "cuda")
        return to_device(x, y, device)

    def host_batch(self, index: np.ndarray | torch.Tensor, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch gathered in CPU memory as float16 inputs and uint8 labels; in pinned (page-locked)
        memory when ``pin``, which a copy to the GPU needs to be asynchronous (CUDA only).

        Resident sets gather from RAM, others read the memory-mapped cache.
        """
        index = np.asarray(index)
        neigh = self.neighbours_np[index]
        size = self.cases[0].image.shape[1:]
        x = torch.empty((*neigh.shape, *size), dtype=torch.float16, pin_memory=pin)
        y = torch.empty((len(index), *size), dtype=torch.uint8, pin_memory=pin)
        if self.resident:
            torch.index_select(self.images, 0, torch.from_numpy(neigh.reshape(-1)), out=x.view(-1, *size))
            torch.index_select(self.labels, 0, torch.from_numpy(index), out=y)
            return x, y
        case, local = self.case_of[neigh], neigh - self.offsets[self.case_of[neigh]]
        xn, yn = x.numpy(), y.numpy()
        for b in range(neigh.shape[0]):
            for j in range(neigh.shape[1]):
                xn[b, j] = self.cases[case[b, j]].image[local[b, j]]
            ci = self.case_of[index[b]]
            yn[b] = self.cases[ci].label[index[b] - self.offsets[ci]]
        return x, y


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs as float32 and labels as int64 on ``device`` (converted there: half the bytes travel)."""
    return x.to(device, non_blocking=True).float(), y.to(device, non_blocking=True).long()


def iter_batches(data: SliceSet, batches: Sequence[np.ndarray],
                 device: torch.device) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Yield the batches ``batches`` of ``data`` on ``device``, prefetching where the slices live elsewhere.

    Slices resident on the training device are gathered there, at once. Slices in CPU memory or in
    the memory-mapped cache are gathered one batch ahead in a background thread (into pinned memory
    when training on a GPU), so reading and copying overlap the step that runs meanwhile.
    """
    if data.resident and (data.device.type != "cpu" or device.type == "cpu"):  # gathered where the slices are
        for idx in batches:
            yield data.batch(idx, device)
        return
    pin = device.type == "cuda"
    with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as pool:
        ahead = pool.submit(data.host_batch, batches[0], pin) if len(batches) else None
        for i in range(len(batches)):
            x, y = ahead.result()
            if i + 1 < len(batches):
                ahead = pool.submit(data.host_batch, batches[i + 1], pin)
            yield to_device(x, y, device)


def make_slice_sets(train_cases: Sequence[CachedCase], val_cases: Sequence[CachedCase], settings: dict,
                    device: torch.device) -> tuple[SliceSet, np.ndarray, SliceSet, np.ndarray]:
    """The training and validation slices of a stage, and the indices of those it uses (notebook: "Preprocess").

    The slices live on the GPU when they fit (:func:`choose_data_device`); with several GPUs each training
    process loads its own copy, so they stay in memory-mapped files here. Both sets drop the same share of
    slices without liver (the recipe's ``empty_fraction``).

    Returns:
        (training set, its slice indices, validation set, its slice indices).
    """
    s, one_gpu = settings, settings["GPUS"] == 1
    n_bytes = sum(c.image.nbytes + c.label.nbytes for c in [*train_cases, *val_cases])
    where = choose_data_device(n_bytes, device) if one_gpu else torch.device("cpu")
    sets = [SliceSet(cases, s["CONTEXT_SLICES"], where, resident=None if one_gpu else False)
            for cases in (train_cases, val_cases)]
    empty = s["RECIPE_SETTINGS"]["empty_fraction"]
    return (sets[0], select_slices(train_cases, empty, seed=s["SEED"]),
            sets[1], select_slices(val_cases, empty, seed=s["SEED"]))


LESION_BAND_HU = 15.0  # contrast-balanced sampling: lesions within +-15 HU of the liver are "faint"


def lesion_contrasts(image: np.ndarray, label: np.ndarray, liver_level: float | None = None,
                     components: tuple[np.ndarray, int] | None = None) -> tuple:
    """The lesions of a labelled volume and how much each differs from the liver.

    Args:
        image: intensities (HU, or anything linear in HU), the label's shape.
        label: 0/1/2 labels; lesions are 26-connected components of label 2.
        liver_level: the liver's intensity; None = the median of ``image`` over label 1 (NaN without liver).
        components: the lesions already labelled, (components, count), e.g. face-connected as LiTS counts them.

    Returns:
        (components: int array of the label's shape, 0 outside lesions and k inside lesion k;
        deltas: (n,) each lesion's mean intensity minus the liver level).
    """
    from scipy import ndimage
    comps, n = components if components is not None else ndimage.label(label == 2, np.ones((3, 3, 3), bool))
    if liver_level is None:
        liver_level = float(np.median(image[label == 1])) if (label == 1).any() else float("nan")
    return comps, np.asarray(ndimage.mean(image, comps, np.arange(1, n + 1)), np.float64).reshape(n) - liver_level


CONTRAST_GROUPS = ("hypodense", "faint", "hyperdense")  # contrast_group's 0, 1, 2


def contrast_group(deltas_hu: np.ndarray, band_hu: float = LESION_BAND_HU) -> np.ndarray:
    """0 hypodense (below ``-band_hu``), 1 faint (within the band), 2 hyperdense (above ``+band_hu``)."""
    return np.where(deltas_hu < -band_hu, 0, np.where(deltas_hu > band_hu, 2, 1))


def lesion_contrast_groups(case: CachedCase, band_hu: float = LESION_BAND_HU) -> np.ndarray:
    """Each slice's lesion contrast group: -1 no lesion, 0 hypodense, 1 faint, 2 hyperdense.

    Lesions (:func:`lesion_contrasts`) of the case's network slices are grouped by their difference
    from the liver's median (label 1), in HU through the case's window (``meta["hu_window"]``), by
    :func:`contrast_group`. A slice holding lesions of several groups takes the faint or hyperdense one
    with more voxels there (the rarer looks); a tumour slice whose lesion vanished at network
    resolution is -1.

    Args:
        case: a cached case (stage 1's slices, or a liver-box view from :func:`roi_cases`) with labels.
        band_hu: half-width of the faint band around the liver's intensity.

    Returns:
        (Z,) int8 array.
    """
    label, groups = np.asarray(case.label), np.full(case.label.shape[0], -1, np.int8)
    zs = np.flatnonzero((label == 2).any(axis=(1, 2)))
    if not len(zs) or not (label == 1).any():
        return groups
    lo, hi = case.meta["hu_window"]
    z0, z1 = zs[0], zs[-1] + 1
    liver = float(np.median(case.image[label == 1].astype(np.float32))) * (hi - lo)
    comps, deltas = lesion_contrasts(np.asarray(case.image[z0:z1], np.float32) * (hi - lo), label[z0:z1], liver)
    kind = contrast_group(deltas, band_hu)
    votes = np.zeros((z1 - z0, 3), np.int64)  # voxels of each group per slice
    np.add.at(votes, (np.nonzero(comps)[0], kind[comps[comps > 0] - 1]), 1)
    rare = votes[:, 1:].argmax(axis=1) + 1
    groups[z0:z1] = np.where(votes[:, 1:].sum(axis=1) > 0, rare, np.where(votes[:, 0] > 0, 0, -1))
    return groups


def slice_contrast_groups(cases: Sequence[CachedCase]) -> np.ndarray:
    """:func:`lesion_contrast_groups` of the cases, in the order of a :class:`SliceSet` of them (its
    ``tumor_groups`` for :class:`TumorAwareSampler`)."""
    return np.concatenate([lesion_contrast_groups(c) for c in cases])


class TumorAwareSampler:
    """Batches of slice indices with a fixed share drawn from tumour slices and from liver slices.

    As nnU-Net oversamples foreground, a share ``tumor_share`` of each batch comes from slices
    with tumour and ``liver_share`` from slices with liver; the rest is drawn uniformly from
    ``pool``.  With both shares 0 this is plain uniform sampling (the baseline recipe).
    With ``tumor_groups`` (per slice, :func:`lesion_contrast_groups`) the tumour draws first pick a
    contrast group uniformly, then a slice of it, so rare lesion looks are seen as often as common ones.
    Each epoch is a fixed function of (seed, epoch), so a resumed run sees the same batches.
    """

    def __init__(self, pool: np.ndarray, has_liver: np.ndarray, has_tumor: np.ndarray, batch_size: int,
                 tumor_share: float = 0.0, liver_share: float = 0.0, seed: int = 0,
                 tumor_groups: np.ndarray | None = None):
        self.pool = np.asarray(pool)
        self.tumor = self.pool[has_tumor[self.pool]]
        # contrast-balanced: each group of tumour slices (lesion_contrast_groups) gets an equal share of the draws;
        # a tumour slice without a group (its lesion vanished at network resolution) counts as hypodense
        groups = None if tumor_groups is None else np.maximum(tumor_groups[self.tumor], 0)
        self.tumor_by_group = None if groups is None else [self.tumor[groups == g] for g in np.unique(groups)]
        self.liver = self.pool[has_liver[self.pool]]
        self.batch_size, self.seed = batch_size, seed
        self.n_tumor = int(round(batch_size * tumor_share)) if len(self.tumor) else 0
        self.n_liver = int(round(batch_size * liver_share)) if len(self.liver) else 0
        if self.n_tumor + self.n_liver > batch_size:
            raise ValueError("tumor_share + liver_share must be <= 1")

    def __len__(self) -> int:
        return max(1, len(self.pool) // self.batch_size)

    def epoch(self, epoch: int) -> list[np.ndarray]:
        """The list of index batches for ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch])
        n_uniform = self.batch_size - self.n_tumor - self.n_liver
        perm = rng.permutation(self.pool)
        batches = []
        for b in range(len(self)):
            parts = [perm[b * n_uniform:(b + 1) * n_uniform] if n_uniform else perm[:0]]
            if self.n_tumor:
                parts.append(self._tumor_draws(rng))
            if self.n_liver:
                parts.append(rng.choice(self.liver, self.n_liver))
            batches.append(np.concatenate(parts))
        return batches

    def _tumor_draws(self, rng: np.random.Generator) -> np.ndarray:
        """``n_tumor`` tumour slices: uniform over them, or a group drawn first (uniform over the groups)."""
        if self.tumor_by_group is None:
            return rng.choice(self.tumor, self.n_tumor)
        groups = rng.integers(len(self.tumor_by_group), size=self.n_tumor)
        return np.array([rng.choice(self.tumor_by_group[g]) for g in groups], dtype=self.tumor.dtype)


@dataclass(frozen=True)
class Augmentation:
    """What :func:`augment_batch` draws for each training sample, on the device.

    The defaults are the whole-slice augmentation both recipes train with; :func:`recipe_augmentation` adds a
    recipe's extras (the lesions' contrast, stage 2's mirroring).
    """

    p: float = 0.8                              # chance that a sample is augmented at all
    rotate_deg: float = 12.0                    # rotation, uniform in +-rotate_deg
    scale: tuple[float, float] = (0.85, 1.15)   # zoom factor range
    translate: float = 0.04                     # shift, up to this share of the side
    intensity: float = 0.1                      # gain 1 +- intensity and offset +- intensity
    noise: float = 0.03                         # Gaussian noise, standard deviation up to this
    lesion_p: float = 0.0                       # share of tumour slices whose lesion contrast changes; 0: off
    mirror: float = 0.0                         # chance of a left-right flip, and independently an up-down one


def recipe_augmentation(rec: dict, stage2: bool = False) -> Augmentation:
    """A recipe's augmentation for stage 1 (whole slices) or stage 2 (windows inside the liver box).

    ``lesion_augment``: in half the tumour slices the lesions' mean difference from the liver is scaled by
    0.5-1.5, its sign flipped half the time (:func:`lesion_contrast`). ``stage2_mirror``: stage 2's windows are
    flipped left-right and up-down, each with chance 1/2 (inside the box no side is special; whole slices are
    never mirrored: the liver lies on the patient's right).
    """
    return Augmentation(lesion_p=0.5 if rec.get("lesion_augment") else 0.0,
                        mirror=0.5 if stage2 and rec.get("stage2_mirror") else 0.0)


def _affine_grid(rand: Any, on: torch.Tensor, shape: Sequence[int], rotate_deg: float,
                 scale: tuple[float, float], translate: float, mirror: float = 0.0) -> torch.Tensor:
    """Sampling grid of a random rotation, scaling and shift per sample, mirrored along each axis with probability
    ``mirror`` (:func:`augment_batch`'s geometry)."""
    b = shape[0]
    angle = (rand(b) * 2 - 1) * math.radians(rotate_deg) * on
    s = 1 + (rand(b) * (scale[1] - scale[0]) + scale[0] - 1) * on
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    tx, ty = ((rand(2, b) * 2 - 1) * 2 * translate * on).unbind(0)  # grid units span 2
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(shape), align_corners=False)
    if mirror > 0:  # -1 flips that axis: output pixel i reads input W-1-i (align_corners=False)
        grid = grid * (1 - 2 * (rand(b, 1, 1, 2) < mirror).float())
    return grid


def augment_batch(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
                  aug: Augmentation = Augmentation(), window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rotation/scaling/shift, intensity shift/scale and Gaussian noise, on x's device (:class:`Augmentation`).

    No mirroring by default: on whole slices it would break the prior that the liver lies on the patient's
    right. Stage 2 of the cascade sees windows inside the liver box, where no such prior holds (``aug.mirror``).
    Draws that are off (lesion contrast, mirror at 0) draw nothing, so the other draws are those of a run without
    them.

    Args:
        x: (B, C, S, S) float images in [0, 1]; y: (B, S, S) long labels.
        generator: torch generator on x's device, for reproducibility.
        aug: what to draw.
        window: a side below S returns a ``window`` × ``window`` window of each augmented sample, placed as
            :func:`random_patches` places it on the warped labels; only the window's pixels are computed (the
            image is warped there alone). Without noise and lesion contrast, the same pixels as
            :func:`random_patches` applied to this function's whole-slice output; those two are then drawn
            and measured on the window.

    Returns:
        (augmented x, y): (B, C, S, S) and (B, S, S), or (B, C, window, window) and (B, window, window).
    """
    b, dev = x.shape[0], x.device

    def rand(*shape):
        return torch.rand(*shape, device=dev, generator=generator)

    on = (rand(b) < aug.p).float()
    grid = _affine_grid(rand, on, x.shape, aug.rotate_deg, aug.scale, aug.translate, aug.mirror)
    y = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="border",
                      align_corners=False)[:, 0].long()
    gain = 1 + (rand(b, 1, 1, 1) * 2 - 1) * aug.intensity * on.view(b, 1, 1, 1)
    shift = (rand(b, 1, 1, 1) * 2 - 1) * aug.intensity * on.view(b, 1, 1, 1)
    if window and (window < x.shape[-1] or x.shape[-2] != x.shape[-1]):  # warp the image only in the window
        top, left = patch_origins(y, window, generator)
        grid, y = take_windows(grid, top, left, window), take_windows(y, top, left, window)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = x * gain + shift
    if aug.noise > 0:
        gauss = torch.randn(x.shape, device=dev, generator=generator)  # drawn before the per-sample scale
        x = x + gauss * aug.noise * rand(b, 1, 1, 1) * on.view(b, 1, 1, 1)
    if aug.lesion_p > 0:
        x = lesion_contrast(x, y, rand(3, b), aug.lesion_p)
    return x, y


def patch_origins(y: torch.Tensor, size: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left corners of :func:`random_patches`' windows: (top, left), each (B,) long, on y's device.

    Each window is centred (then shifted inside the slice) on one pixel drawn per sample: with tumour in the
    sample, with probability 1/2 a tumour pixel (each alike), else any pixel (each alike). No host sync.

    Args:
        y: (B, S, S) labels (2 = tumour); size: window side, at most S.
        generator: torch generator on y's device.
    """
    s = y.shape[-1]
    if y.shape[-2] != s:
        raise ValueError(f"training windows need square slices, got {tuple(y.shape[-2:])}")
    tumor = (y == 2).flatten(1)
    count = tumor.sum(1)
    u = torch.rand(3, y.shape[0], device=y.device, generator=generator)
    anywhere = (u[0] * (s * s)).long().clamp(max=s * s - 1)
    # the k-th tumour pixel, k uniform: the first index where the running count reaches k + 1 (no host sync)
    kth = torch.searchsorted(tumor.cumsum(1), ((u[1] * count).long() + 1)[:, None])[:, 0].clamp(max=s * s - 1)
    centre = torch.where((u[2] < 0.5) & (count > 0), kth, anywhere)
    return (centre // s - size // 2).clamp(0, s - size), (centre % s - size // 2).clamp(0, s - size)


def take_windows(t: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """Sample b's ``size`` × ``size`` window at (``top[b]``, ``left[b]``) of a (B, S, S, ...) tensor (dims 1, 2)."""
    ar = torch.arange(size, device=t.device)
    rows, cols = (top[:, None] + ar)[:, :, None], (left[:, None] + ar)[:, None, :]
    return t[torch.arange(t.shape[0], device=t.device)[:, None, None], rows, cols]


def random_patches(x: torch.Tensor, y: torch.Tensor, size: int,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``size`` × ``size`` window of each sample, centred on tumour half the time where the sample has any.

    Windows are placed by :func:`patch_origins`. A fully convolutional U-Net trained on windows predicts
    whole slices; a window costs (size / S)² of a slice's compute, so a fixed training time buys that many
    more samples (nnU-Net trains on patches). Training with augmentation cuts the windows inside
    :func:`augment_batch` (``window``), which then warps only their pixels.

    Args:
        x: (B, C, S, S) images; y: (B, S, S) labels (2 = tumour); size: window side, at most S.
        generator: torch generator on x's device.

    Returns:
        (B, C, size, size) images and (B, size, size) labels.
    """
    if size >= x.shape[-1] and x.shape[-2] == x.shape[-1]:
        return x, y
    top, left = patch_origins(y, size, generator)
    return take_windows(x.permute(0, 2, 3, 1), top, left, size).permute(0, 3, 1, 2), take_windows(y, top, left, size)


def lesion_contrast(x: torch.Tensor, y: torch.Tensor, draws: torch.Tensor, p: float = 0.5,
                    magnitude: tuple[float, float] = (0.5, 1.5), flip: float = 0.5) -> torch.Tensor:
    """Change how much the lesions of each slice differ from their liver: a faint, strong or inverted version.

    Per slice with both tumour and liver in its label, with probability ``p``: d = mean(tumour) - mean(liver)
    of the centre channel; the tumour pixels are shifted by (k - 1)·d, so that d becomes k·d, with k drawn
    in ``magnitude`` and negated with probability ``flip``; the pixels just outside by a part of that (the
    tumour share of their 3x3 neighbourhood), so that no sharp edge marks the label. Texture and noise inside
    the lesion are kept; all channels get the centre slice's shift.
    Synthetic lesions are mostly hypodense and real ones vary in contrast; a model that has met every contrast
    is not bound to the frequencies of its training set. Limits: one d per slice (a dark and a bright lesion
    in one slice get their average, and move together); the rim shift reaches background where a lesion
    touches the liver's edge. On in the default recipe (``lesion_augment``), with stage 2's mirroring
    (BENCHMARKS.md); off in the baseline.

    Args:
        x: (B, C, S, S) images; y: (B, S, S) labels (0 background, 1 liver, 2 tumour) of the centre channel.
        draws: (3, B) uniform numbers in [0, 1): whether, how much, which sign.
    Returns:
        x with the lesions' contrast changed (a new tensor).
    """
    tumor, liver = (y == 2)[:, None].to(x.dtype), (y == 1)[:, None].to(x.dtype)
    n_t, n_l = tumor.sum((2, 3)), liver.sum((2, 3))  # (B, 1)
    mid = x[:, x.shape[1] // 2:x.shape[1] // 2 + 1]
    d = (mid * tumor).sum((2, 3)) / n_t.clamp(min=1) - (mid * liver).sum((2, 3)) / n_l.clamp(min=1)
    k = magnitude[0] + draws[1] * (magnitude[1] - magnitude[0])
    k = torch.where(draws[2] < flip, -k, k)[:, None]
    on = ((draws[0] < p)[:, None] & (n_t > 0) & (n_l > 0)).to(x.dtype)
    soft = torch.maximum(tumor, F.avg_pool2d(tumor, 3, stride=1, padding=1, count_include_pad=False))
    return x + ((k - 1) * d * on)[:, :, None, None] * soft


# =============================================================================================
# 4. Model: a small 2D / 2.5D U-Net                                             (notebook: "Model")
# =============================================================================================

def _norm(kind: str, channels: int) -> torch.nn.Module:
    """BatchNorm (default) or InstanceNorm (better with batch size <= 4)."""
    if kind == "batch":
        return torch.nn.BatchNorm2d(channels)
    if kind == "instance":
        return torch.nn.InstanceNorm2d(channels, affine=True)
    raise ValueError(f"norm must be 'batch' or 'instance', got {kind!r}")


class DoubleConv(torch.nn.Sequential):
    """(3x3 conv -> norm -> ReLU) x 2: the U-Net's basic block."""

    def __init__(self, in_ch: int, out_ch: int, norm: str = "batch"):
        super().__init__(
            torch.nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), _norm(norm, out_ch), torch.nn.ReLU(inplace=True),
            torch.nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), _norm(norm, out_ch), torch.nn.ReLU(inplace=True))


class Down(torch.nn.Sequential):
    """Downscale by 2 with max-pooling, then DoubleConv."""

    def __init__(self, in_ch: int, out_ch: int, norm: str = "batch"):
        super().__init__(torch.nn.MaxPool2d(2), DoubleConv(in_ch, out_ch, norm))


class Up(torch.nn.Module):
    """Upscale by 2, pad to the skip connection's size, concatenate, DoubleConv."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, norm: str = "batch", mode: str = "bilinear"):
        super().__init__()
        if mode == "bilinear":
            self.up = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                          torch.nn.Conv2d(in_ch, in_ch // 2, 1))
        elif mode == "transpose":
            self.up = torch.nn.ConvTranspose2d(in_ch, in_ch // 2, 2, stride=2)
        else:
            raise ValueError(f"up mode must be 'bilinear' or 'transpose', got {mode!r}")
        self.conv = DoubleConv(in_ch // 2 + skip_ch, out_ch, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        dy, dx = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        if dy or dx:  # odd input sizes: pad so the upsampled map matches the skip
            x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class OutConv(torch.nn.Conv2d):
    """1x1 convolution to one logit per class."""

    def __init__(self, in_ch: int, num_classes: int):
        super().__init__(in_ch, num_classes, 1)


class UNet(torch.nn.Module):
    """2D U-Net (Ronneberger et al. 2015); ``in_channels`` = the 2.5D context (1, 3, 5 slices).

    Args:
        in_channels: input slices stacked as channels.
        num_classes: output classes (3: background, liver, tumour).
        base_channels: channels of the first block; doubled at every level.
        depth: number of down-sampling steps (input sizes need not be multiples of 2**depth).
        norm: 'batch' or 'instance'.
        up: 'bilinear' (upsample + 1x1 conv) or 'transpose' (transposed conv).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 3, base_channels: int = 32, depth: int = 4,
                 norm: str = "batch", up: str = "bilinear"):
        super().__init__()
        ch = [base_channels * 2 ** i for i in range(depth + 1)]
        self.inc = DoubleConv(in_channels, ch[0], norm)
        self.downs = torch.nn.ModuleList([Down(ch[i], ch[i + 1], norm) for i in range(depth)])
        self.ups = torch.nn.ModuleList([Up(ch[i + 1], ch[i], ch[i], norm, up) for i in reversed(range(depth))])
        self.outc = OutConv(ch[0], num_classes)
        self.hparams = {"in_channels": in_channels, "num_classes": num_classes, "base_channels": base_channels,
                        "depth": depth, "norm": norm, "up": up}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)


def describe_model(model: UNet, image_size: int = 256) -> dict:
    """Parameter count and a shape check on a (2, C, S, S) input (notebook: "Model")."""
    c = model.hparams["in_channels"]
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(2, c, image_size, image_size, device=dev))
    model.train(was_training)
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "input_shape": [2, c, image_size, image_size], "output_shape": list(out.shape)}


# =============================================================================================
# 5. Loss: cross-entropy + soft Dice                                              (notebook: "Loss")
# =============================================================================================

class DiceCELoss(torch.nn.Module):
    """Cross-entropy + soft Dice of the liver and tumour classes, computed from the softmax.

    Why Dice: tumour is ~1 % of the liver and far less of the slice, so per-voxel cross-entropy
    is dominated by background and a model can score well by never predicting tumour.  Dice is a
    ratio of overlap to size *per class*, so a small class weighs as much as a big one; the background's
    Dice is left out (it is trivially high). CE keeps the gradients well-behaved early on; the sum trains
    fast and stably (nnU-Net).

    Args:
        batch_dice: pool the Dice sums over the whole batch (stable when many slices hold no tumour)
            instead of averaging per-slice Dice (which is undefined/noisy on empty slices).
        smooth: added to numerator and denominator (a class absent from both scores 1, not 0 / 0).

    Returns (forward):
        (total loss, {"ce": ..., "dice": ...}) with detached parts for logging.
    """

    def __init__(self, batch_dice: bool = True, smooth: float = 1e-5):
        super().__init__()
        self.batch_dice, self.smooth = batch_dice, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits = logits.float()
        ce = F.cross_entropy(logits, target)
        tp, fp, fn = self.soft_counts(logits, target)
        dice_loss = 1 - ((tp + self.smooth) / (tp + 0.5 * fp + 0.5 * fn + self.smooth)).mean()  # 2tp / (2tp+fp+fn)
        return ce + dice_loss, {"ce": ce.detach(), "dice": dice_loss.detach()}

    def soft_counts(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Soft tp, fp, fn of liver and tumour (each of shape (2,), or (B, 2) per slice): softmax sums."""
        probs = logits.softmax(1)[:, 1:]  # liver, tumour
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
        dims = (0, 2, 3) if self.batch_dice else (2, 3)
        return (probs * onehot).sum(dims), (probs * (1 - onehot)).sum(dims), ((1 - probs) * onehot).sum(dims)


LOSSES: dict[str, dict] = {  # named DiceCELoss settings: the notebook's LOSS
    "dice_ce": {},
    "dice_ce_per_slice": {"batch_dice": False},
}


def make_loss(name: str = "dice_ce", **kwargs: Any) -> DiceCELoss:
    """Loss by name: 'dice_ce' (Dice pooled over the batch; both recipes) or 'dice_ce_per_slice' (the mean of
    each slice's Dice, ``batch_dice=False``); ``kwargs`` go to :class:`DiceCELoss`."""
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {name!r}")
    return DiceCELoss(**{**LOSSES[name], **kwargs})


# =============================================================================================
# 6. Training                                                                    (notebook: "Train")
# =============================================================================================

def choose_data_device(n_bytes: int, device: torch.device, share: float = 0.4) -> torch.device:
    """Keep the training slices on the GPU when they take under ``share`` of its free memory.

    Free memory counts what the driver has free plus what torch's caching allocator holds reserved but
    unused (freed tensors, e.g. stage 1's sets before stage 2), which the allocator hands out again.
    """
    if device.type == "cuda":  # an explicit index: torch <= 2.4 refuses a device without one
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _total = torch.cuda.mem_get_info(index)
        free += torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        if n_bytes < share * free:
            return device
    return torch.device("cpu")


@dataclass(frozen=True)
class Sampling:
    """What each training batch is drawn from (:class:`TumorAwareSampler`) and which part of each slice it trains on."""

    tumor_share: float = 0.0            # share of each batch drawn from slices with tumour
    liver_share: float = 0.0            # share drawn from slices with liver
    lesion_balance: bool = False        # tumour draws balanced over lesion contrast groups (lesion_contrast_groups)
    window: int | None = None           # random windows this wide (stage 2; augment_batch's window); None: whole slices


@dataclass
class TrainConfig:
    """Training settings (the notebook's configuration cell fills these)."""

    epochs: int = 20                    # passes over the training slices
    batch_size: int = 16                # slices per optimizer step
    lr: float = 1e-3                    # AdamW peak learning rate
    weight_decay: float = 1e-4          # AdamW weight decay
    warmup_epochs: float = 1.0          # linear warm-up, then cosine decay to 0
    grad_clip: float = 1.0              # max gradient norm
    steps_per_epoch: int | None = None  # None = len(selected slices) // batch_size
    loss: str = "dice_ce"               # make_loss: 'dice_ce' or 'dice_ce_per_slice'
    sampling: Sampling = field(default_factory=Sampling)  # which slices each batch draws, whole or as windows
    augment: Augmentation | None = field(default_factory=Augmentation)  # drawn on the device; None: off
    amp: bool | str = True              # mixed precision on CUDA: True bf16 where native, else fp16; "fp16", "bf16"
    seed: int = 0                       # fixes sampling and augmentation per epoch


VAL_BATCH_SIZE = 64  # slices per validation forward pass


def recipe_train_config(rec: dict, epochs: int, batch_size: int, lr: float, seed: int = 0,
                        steps_per_epoch: int | None = None, stage: int = 1, window: int | None = None) -> TrainConfig:
    """A recipe's training settings for one stage of it.

    Args:
        rec: the recipe (:data:`RECIPES`): its loss, sampling and augmentation keys.
        epochs, batch_size, lr, seed, steps_per_epoch: as :class:`TrainConfig`.
        stage: 1 (whole slices) or 2 (the liver boxes; :func:`recipe_augmentation` mirrors them where the
            recipe says so).
        window: train on random windows this wide (stage 2's ``PATCH_SIZE``); None or 0: whole slices.
    """
    sampling = Sampling(rec["tumor_share"], rec["liver_share"], rec.get("lesion_balance", False), window or None)
    return TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, steps_per_epoch=steps_per_epoch, loss=rec["loss"],
                       sampling=sampling, augment=recipe_augmentation(rec, stage2=stage == 2), seed=seed)


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """The one atomic writer: ``write(tmp)`` fills a temp file in the same folder, then it is renamed.

    Readers never see a half-written file, and a crash leaves the old file intact.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _atomic_write_text(path: Path, text: str) -> None:
    """Write text, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``: tensors and plain data only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def _native_bf16() -> bool:
    """True when the CUDA GPU has bf16 tensor cores: compute capability 8.0 or newer (A100, L4, H100).

    Decided by the capability, not ``torch.cuda.is_bf16_supported()``, which on some releases answers
    True for a T4 or P100 (it only checks that a bf16 tensor can be made); those get fp16 + GradScaler.
    """
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def _amp_dtype(amp: bool | str) -> torch.dtype:
    """The autocast type of a ``TrainConfig.amp`` that is on: "fp16" or "bf16" as named; True bf16 where the GPU
    has it natively, else fp16."""
    if amp in ("fp16", "bf16"):
        return torch.float16 if amp == "fp16" else torch.bfloat16
    if amp is not True:
        raise ValueError(f"amp must be True, False, 'fp16' or 'bf16', got {amp!r}")
    return torch.bfloat16 if _native_bf16() else torch.float16


def mixed_precision(device: torch.device | str) -> str:
    """The training step's arithmetic on ``device`` with ``TrainConfig.amp`` on (as in the notebook):
    "bf16" autocast (CUDA capability 8.0+), "fp16 + GradScaler" (older CUDA GPUs) or "fp32" (CPU, MPS)."""
    if torch.device(device).type != "cuda":
        return "fp32"
    return "bf16" if _native_bf16() else "fp16 + GradScaler"


def autocast(device: torch.device, enabled: bool | str):
    """Mixed-precision context on CUDA (``enabled`` as ``TrainConfig.amp``: True bf16 where native, else fp16 with
    a grad scaler; "fp16" or "bf16" as named); a no-op elsewhere.

    The no-op is a plain ``nullcontext``: older torch releases refuse ``torch.autocast("mps", ...)`` even
    when disabled.
    """
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=_amp_dtype(enabled))
    return contextlib.nullcontext()


@torch.no_grad()
def validate_slices(model: torch.nn.Module, data: SliceSet, index: np.ndarray, loss_fn: DiceCELoss,
                    device: torch.device, batch_size: int = VAL_BATCH_SIZE, amp: bool = True) -> dict:
    """Cheap per-epoch validation: CE, Dice loss and 2D Dice pooled over the given slices.

    This is an approximation for monitoring (2D, on the resized slices); the final numbers come
    from :func:`evaluate`, which scores full 3D volumes on their original grid.  As there, tumour
    Dice (and the mean of liver and tumour) is NaN when the slices hold no true tumour, so one
    false-positive pixel cannot swing it.
    """
    model.eval()
    counts, ce, dl, n = np.zeros((3, 3), np.int64), 0.0, 0.0, 0  # (tp, fp, fn) per class
    for start in range(0, len(index), batch_size):
        x, y = data.batch(index[start:start + batch_size], device)
        with autocast(device, amp):
            logits = model(x.contiguous(memory_format=torch.channels_last))
        _, parts = loss_fn(logits, y)
        pred = logits.argmax(1)
        for c in (1, 2):
            counts[c] += overlap_counts(pred == c, y == c)
        ce += parts["ce"].item() * len(x)
        dl += parts["dice"].item() * len(x)
        n += len(x)
    model.train()
    liver = dice_from_counts(*counts[1])
    tumor = dice_from_counts(*counts[2]) if counts[2, 0] + counts[2, 2] else float("nan")  # needs true tumour
    mean = (liver + tumor) / 2 if not math.isnan(tumor) else float("nan")  # needs true tumour, as dice_mean
    return {"val_ce": ce / n, "val_dice_loss": dl / n, "val_dice_liver_2d": liver, "val_dice_tumor_2d": tumor,
            "val_dice_mean_2d": mean}


def _selection_score(row: dict) -> float:
    """What ``best.pt`` maximises: 2D mean Dice, else liver Dice (no tumour in validation), else -train loss."""
    for key in ("val_dice_mean_2d", "val_dice_liver_2d"):
        if not math.isnan(row.get(key, float("nan"))):
            return row[key]
    return -row["train_dice_loss"]


@dataclass
class TrainState:
    """What a training run carries from step to step (made by :func:`make_train_state`)."""

    model: torch.nn.Module
    loss_fn: DiceCELoss
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: Any                   # torch.amp.GradScaler (torch.cuda.amp.GradScaler before torch 2.3)
    device: torch.device
    use_amp: bool | str           # "bf16" or "fp16" on CUDA with TrainConfig.amp on, else False
    memory_format: torch.memory_format


def make_train_state(model: torch.nn.Module, cfg: TrainConfig, steps_per_epoch: int,
                     device: torch.device) -> TrainState:
    """Model on ``device``, the loss, AdamW, linear warm-up then cosine decay to 0, and the fp16 grad scaler."""
    memfmt = torch.channels_last  # faster convolutions on GPUs and CPUs
    model.to(device, memory_format=memfmt)
    total = steps_per_epoch * cfg.epochs
    warm = max(1, min(int(cfg.warmup_epochs * steps_per_epoch), total // 2))  # a 1-epoch stage also decays
    opt = adamw(model.parameters(), cfg.lr, cfg.weight_decay)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine to 0
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    # resolved once here (an unknown amp is refused on every device), so no step asks the GPU for its type again
    dtype = _amp_dtype(cfg.amp) if cfg.amp else None
    use_amp = ("bf16" if dtype == torch.bfloat16 else "fp16") if dtype is not None and device.type == "cuda" else False
    fp16 = use_amp == "fp16"  # the gradient scaler: torch.amp's from torch 2.3 on, torch.cuda.amp's before
    scaler = (torch.amp.GradScaler("cuda", enabled=fp16) if hasattr(torch.amp, "GradScaler")
              else torch.cuda.amp.GradScaler(enabled=fp16))
    return TrainState(model, make_loss(cfg.loss).to(device), opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor),
                      scaler, device, use_amp, memfmt)


def adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where this torch build has that for the parameters' device (CUDA;
    the CPU from torch 2.4): the same update in fewer kernel calls (BENCHMARKS.md, stage 2 on windows)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch: fused AdamW is CUDA-only
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def train_step(state: TrainState, x: torch.Tensor, y: torch.Tensor, grad_clip: float = 1.0) -> tuple:
    """One optimizer step: forward, loss, backward, clip, step (the notebook's "Train" section defines the same
    function on the page and passes it to :func:`train`; this one is the default).

    Returns:
        (loss, {"ce", "dice"}) as tensors on the device (reading them would wait for the GPU).
    """
    with autocast(state.device, state.use_amp):  # bf16/fp16 on CUDA, plain fp32 elsewhere
        logits = state.model(x)
    loss, parts = state.loss_fn(logits, y)  # CE + soft Dice
    state.opt.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()  # the scaler guards fp16 gradients; a pass-through otherwise
    state.scaler.unscale_(state.opt)
    torch.nn.utils.clip_grad_norm_(state.model.parameters(), grad_clip)
    state.scaler.step(state.opt)
    state.scaler.update()
    state.sched.step()  # learning rate for the next step
    return loss, parts


def epoch_batches(sampler: TumorAwareSampler, epoch: int, steps: int) -> list[np.ndarray]:
    """The index batches of one epoch: ``steps`` of them, drawing further passes when one is not enough."""
    batches = sampler.epoch(epoch)
    while len(batches) < steps:
        batches += sampler.epoch(epoch + 100_000 * (len(batches) // len(sampler) + 1))
    return batches[:steps]


def shard_batches(batches: list[np.ndarray], rank: int, world: int) -> list[np.ndarray]:
    """Process ``rank``'s share of every batch when ``world`` processes train together (all of it when alone)."""
    return [idx[rank::world] for idx in batches] if world > 1 else batches


def train_epoch(state: TrainState, data: SliceSet, batches: list[np.ndarray], cfg: TrainConfig, epoch: int,
                progress: bool = True, step: Callable | None = None) -> tuple[float, float]:
    """Run ``step`` (None: :func:`train_step`) over one epoch's batches (augmented on the device); mean CE and
    Dice loss."""
    step_fn = step or train_step
    rank, world = dist_rank_world()
    gen = torch.Generator(device=state.device)  # rank 0 draws as a single process does; the others their own
    gen.manual_seed(hash_seed(cfg.seed, epoch, 7) if rank == 0 else hash_seed(cfg.seed, epoch, 7, rank))
    batches = shard_batches(batches, rank, world)  # data-parallel: each process takes its share of every batch
    # CE, Dice loss: read once per epoch, so logging adds no GPU sync per step (with fused AdamW the fp16
    # GradScaler does not sync either: the optimizer kernel reads the overflow flag on the GPU and skips the step)
    sums = torch.zeros(2, device=state.device)
    bar = tqdm(iter_batches(data, batches, state.device), desc=f"epoch {epoch + 1}", total=len(batches),
               leave=False, unit="batch", disable=not progress, mininterval=2.0)
    window = cfg.sampling.window
    for i, (x, y) in enumerate(bar):
        if cfg.augment is not None:  # with stage 2's windows: cut inside the augmentation, which warps only them
            x, y = augment_batch(x, y, gen, cfg.augment, window)
        elif window:
            x, y = random_patches(x, y, window, generator=gen)
        loss, parts = step_fn(state, x.contiguous(memory_format=state.memory_format), y, cfg.grad_clip)
        sums += torch.stack([parts["ce"], parts["dice"]])
        if progress and i % 10 == 0:  # live loss, synced every 10th step only
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if world > 1:  # the mean over all processes
        torch.distributed.all_reduce(sums)
        sums /= world
    ce_sum, dice_sum = sums.tolist()
    return ce_sum / len(batches), dice_sum / len(batches)


RUN_KEYS = ("RECIPE", "RECIPE_SETTINGS", "PRESET", "EPOCHS", "IMAGE_SIZE", "BATCH_SIZE", "BASE_CHANNELS", "DEPTH",
            "CONTEXT_SLICES", "CASCADE", "ROI_SIZE", "PATCH_SIZE", "LOSS", "HU_WINDOW", "VAL_FRACTION", "LR",
            "STEPS_PER_EPOCH", "SEED", "FOLD")  # what shapes a run's learning (not RESUME, DEVICE, EVAL_CHECKPOINT ...)


INFERENCE_ONLY = ("min_tumor_ml", "average_liver")  # recipe keys used only after training: no other run


def run_identity(settings: dict, train_ids: Sequence[str], data_root: str | os.PathLike) -> dict:
    """What makes two training runs the same run: the :data:`RUN_KEYS` settings, the data and the training cases.

    :func:`train` stores it in its checkpoints and refuses to resume one whose identity differs. The recipe's
    :data:`INFERENCE_ONLY` keys are left out.
    """
    body = {**{k: settings.get(k) for k in RUN_KEYS}, "data_root": str(data_root), "train_cases": list(train_ids)}
    if isinstance(body["RECIPE_SETTINGS"], dict):
        body["RECIPE_SETTINGS"] = {k: v for k, v in body["RECIPE_SETTINGS"].items() if k not in INFERENCE_ONLY}
    return json.loads(json.dumps(body, default=str))


def _with_defaults(stored: dict) -> dict:
    """A stored :class:`TrainConfig` with the settings added since it was written (also inside ``sampling`` and
    ``augment``) filled in with their defaults: what that run used."""
    out = asdict_plain(TrainConfig())
    for k, v in stored.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested settings as one level: {"sampling": {"window": 64}} -> {"sampling.window": 64}."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _differences(old: dict, new: dict) -> str:
    """'KEY: old -> new' for every key whose value differs (lists shortened)."""
    def short(v):
        return f"[{len(v)} items]" if isinstance(v, list) and len(v) > 4 else repr(v)
    return "; ".join(f"{k}: {short(old.get(k))} -> {short(new.get(k))}" for k in sorted(set(old) | set(new))
                     if old.get(k) != new.get(k))


def resume_state(path: Path, state: TrainState, cfg: TrainConfig,
                 run: dict | None = None) -> tuple[int, list[dict], float]:
    """Load ``last.pt`` into ``state`` when it was written by the same run: (next epoch, history, best).

    Raises:
        ValueError: naming what differs, when the checkpoint's training settings or run identity
        (:func:`run_identity`) are not today's: continuing would train old weights on other data.
    """
    ck = load_checkpoint(path, map_location=state.device)
    known = _flat(asdict_plain(TrainConfig()))
    gone = sorted(k for k in _flat(ck["train_config"]) if k not in known
                  and not any(j.startswith(k + ".") for j in known))  # e.g. "augment": None stands for augment.*
    if gone:
        raise ValueError(f"{path} was written by an older unet_helpers (its settings {gone} no longer exist). To "
                         "start afresh, use another OUTPUT_DIR or delete that file.")
    # the arithmetic (amp) may differ: a run started on one GPU may go on on another
    diff = _differences(_flat({**_with_defaults(ck["train_config"]), "amp": cfg.amp}), _flat(asdict_plain(cfg)))
    if run is not None:
        diff = "; ".join(d for d in (diff, _differences(ck.get("run") or {}, run)) if d)
    if diff:
        raise ValueError(f"{path} was written with other training settings ({diff}). To start afresh, use another "
                         "OUTPUT_DIR or delete that file; to continue the old run, restore its settings.")
    state.model.load_state_dict(ck["model"])
    kernels = [(g.get("fused"), g.get("foreach")) for g in state.opt.param_groups]
    state.opt.load_state_dict(ck["optimizer"])
    for g, (fused, foreach) in zip(state.opt.param_groups, kernels):  # today's kernels, not the saving machine's
        g["fused"], g["foreach"] = fused, foreach
    state.sched.load_state_dict(ck["scheduler"])
    if ck["scaler"] and state.scaler.is_enabled():  # fp16 then and now; a bf16/CPU run saved an empty scaler
        state.scaler.load_state_dict(ck["scaler"])
    return ck["epoch"] + 1, ck["history"], ck["best"]


def save_checkpoints(out: Path, state: TrainState, cfg: TrainConfig, epoch: int, history: list[dict],
                     best: float, extra_state: dict | None = None, run: dict | None = None) -> float:
    """Write ``last.pt`` (and ``best.pt`` when this epoch scores best) and the history; returns the new best."""
    score = _selection_score(history[-1])
    # unwrap: plain parameter names, also after multi-GPU training (the checkpoint fits any number of GPUs)
    ck = {"model": unwrap(state.model).state_dict(), "optimizer": state.opt.state_dict(),
          "scheduler": state.sched.state_dict(), "scaler": state.scaler.state_dict(), "epoch": epoch,
          "history": history, "train_config": asdict_plain(cfg), "best": max(best, score),
          "model_hparams": getattr(unwrap(state.model), "hparams", {}), "extra": extra_state or {}, "run": run}
    for name in ("best.pt", "last.pt") if score > best else ("last.pt",):
        atomic_write(out / name, lambda tmp: torch.save(ck, tmp))
    _atomic_write_text(out / "history.json", json.dumps(json_safe(history), indent=1))
    _write_csv(out / "history.csv", history)
    return max(best, score)


def make_sampler(data: SliceSet, index: np.ndarray, cfg: TrainConfig) -> TumorAwareSampler:
    """The sampler :func:`train` draws its batches from: ``cfg.sampling``'s shares, and with ``lesion_balance`` the
    tumour draws spread over the lesion contrast groups of ``data``'s cases."""
    s = cfg.sampling
    groups = slice_contrast_groups(data.cases) if s.lesion_balance and s.tumor_share else None
    return TumorAwareSampler(index, data.has_liver, data.has_tumor, cfg.batch_size, s.tumor_share, s.liver_share,
                             cfg.seed, groups)


def _start_or_resume(out: Path, state: TrainState, cfg: TrainConfig, run: dict | None, resume: bool,
                     progress: bool) -> tuple[int, list[dict], float]:
    """(first epoch, history, best score): from ``out/last.pt`` when resuming one, else a fresh start."""
    if not (resume and (out / "last.pt").exists()):
        return 0, [], -1.0
    start_epoch, history, best = resume_state(out / "last.pt", state, cfg, run)
    if progress and start_epoch < cfg.epochs:
        print(f"Resuming from {out / 'last.pt'} at epoch {start_epoch + 1}/{cfg.epochs}")
    return start_epoch, history, best


def _epoch_row(state: TrainState, data: SliceSet, batches: list[np.ndarray], cfg: TrainConfig, epoch: int,
               progress: bool, step: Callable | None) -> dict:
    """One timed :func:`train_epoch`: its history row (losses, learning rate, seconds, slices per second)."""
    t0 = time.perf_counter()
    ce, dice_loss = train_epoch(state, data, batches, cfg, epoch, progress, step)
    secs = time.perf_counter() - t0
    return {"epoch": epoch + 1, "train_ce": ce, "train_dice_loss": dice_loss, "lr": state.opt.param_groups[0]["lr"],
            "epoch_seconds": secs, "slices_per_second": len(batches) * cfg.batch_size / secs,
            "processes": dist_rank_world()[1]}


def train(model: torch.nn.Module, train_data: SliceSet, train_index: np.ndarray, cfg: TrainConfig,
          output_dir: str | os.PathLike, val_data: SliceSet | None = None, val_index: np.ndarray | None = None,
          device: torch.device | str | None = None, resume: bool = True, progress: bool = True,
          extra_state: dict | None = None, run: dict | None = None, replicas: int = 1,
          step: Callable | None = None) -> list[dict]:
    """Train with CE + Dice, AdamW, warm-up + cosine, clipping; checkpoint and log every epoch.

    Writes ``history.csv`` / ``.json``, ``last.pt`` (every epoch) and ``best.pt`` (best validation mean Dice) into
    ``output_dir``, atomically; resumed from ``last.pt``, a run killed mid-epoch loses at most that epoch.

    Args:
        model: the network (moved to ``device``).
        train_data, train_index: training slices and which of them are sampled.
        cfg, output_dir: the :class:`TrainConfig`; where logs and checkpoints go.
        val_data, val_index: validation slices for the per-epoch 2D check (optional).
        device, progress: None = ``train_data``'s device; tqdm bars.
        resume: continue from ``output_dir/last.pt`` when present.
        extra_state: plain data saved in the checkpoints (e.g. the notebook's config).
        run: the run's identity (:func:`run_identity`): saved, and compared before resuming.
        replicas: data-parallel processes (:func:`train_replicated`): one per GPU on CUDA; on the CPU,
            processes that talk through gloo (for tests). 1 = this process alone.
        step: ``step(state, x, y, grad_clip)`` on every batch; None: :func:`train_step`, which several
            processes always run (a function defined in a notebook cannot be sent to them).

    Returns:
        The history: one dict per epoch.
    """
    rank, world = dist_rank_world()
    if replicas > 1 and world == 1:
        return train_replicated(replicas, model, train_data, train_index, cfg, output_dir, val_data, val_index,
                                device, resume, progress, extra_state, run, step=step)
    (out := Path(output_dir)).mkdir(parents=True, exist_ok=True)
    sampler = make_sampler(train_data, train_index, cfg)
    steps = cfg.steps_per_epoch or len(sampler)
    state = make_train_state(model, cfg, steps, torch.device(device) if device is not None else train_data.device)
    start_epoch, history, best = _start_or_resume(out, state, cfg, run, resume, progress)
    if world > 1:  # after resuming: DDP starts every process from rank 0's weights
        state.model = _ddp_wrap(model, state.device, cfg.batch_size, world)
    model.train()
    bar = tqdm(range(start_epoch, cfg.epochs), desc="epochs", unit="ep", disable=not progress)
    for epoch in bar:
        row = _epoch_row(state, train_data, epoch_batches(sampler, epoch, steps), cfg, epoch, progress, step)
        if rank == 0 and val_data is not None and val_index is not None and len(val_index):
            row.update(validate_slices(model, val_data, val_index, state.loss_fn, state.device, amp=state.use_amp))
        history.append({k: float(v) if k != "epoch" else v for k, v in row.items()})
        if rank == 0:  # one writer; the other processes wait at their next gradient exchange
            best = save_checkpoints(out, state, cfg, epoch, history, best, extra_state, run)
        shown = ("train_ce", "val_dice_liver_2d", "val_dice_tumor_2d")
        bar.set_postfix({k: f"{v:.3f}" for k, v in history[-1].items() if k in shown})
    return history


# --- Several GPUs: DistributedDataParallel, one process per GPU, launched from the notebook ---------------

def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of this process in a data-parallel run; (0, 1) outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DistributedDataParallel wrapper (or the network itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _ddp_wrap(model: torch.nn.Module, device: torch.device, batch_size: int, world: int) -> torch.nn.Module:
    """Wrap ``model`` for data-parallel training; each process then takes ``batch_size / world`` slices a step."""
    if batch_size % world:
        raise ValueError(f"BATCH_SIZE {batch_size} does not split evenly over {world} GPUs; use a multiple of {world}.")
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _free_port() -> int:
    """A free TCP port on the loopback interface, for the processes' rendezvous."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slice_spec(data: SliceSet | None) -> dict | None:
    """What a worker process needs to rebuild ``data``: its cache entries, view and context (no arrays)."""
    if data is None:
        return None
    if any("entry" not in c.meta for c in data.cases):
        raise ValueError("Training on several GPUs needs cached cases from uh.preprocess_dataset.")
    return {"entries": [c.meta["entry"] for c in data.cases], "roi": any(c.meta.get("view") == "roi"
            for c in data.cases), "context": data.context}


def _open_slice_spec(spec: dict | None, device: torch.device) -> SliceSet | None:
    """A worker's :class:`SliceSet`: on its GPU when it fits, else memory-mapped (the page cache then holds one
    copy for all processes, where resident copies in RAM would hold one each)."""
    if spec is None:
        return None
    cases = [_open_entry(Path(e), from_cache=True) for e in spec["entries"]]
    cases = roi_cases(cases) if spec["roi"] else cases
    n_bytes = sum(c.image.nbytes + c.label.nbytes for c in cases)
    on = choose_data_device(n_bytes, device)
    return SliceSet(cases, spec["context"], on, resident=on.type != "cpu")


DDP_TIMEOUT = datetime.timedelta(minutes=10)  # longest wait of one process for the others at a gradient exchange


def _end_with_parent(parent_pid: int, poll_s: float = 2.0) -> None:
    """Make this worker process end when its parent (the notebook's kernel) does, even if the parent is killed.

    Linux: the kernel sends SIGTERM when the parent dies (``PR_SET_PDEATHSIG``); everywhere: a watcher thread
    ends the process once its parent id changes (this also covers a parent that died before the signal was set).
    Without this, workers of a kernel killed by the out-of-memory killer would go on training, holding the GPUs
    and writing ``last.pt`` while the next *Run All* starts.
    """
    import signal
    import threading
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="end-with-parent").start()


def _ddp_worker(rank: int, world: int, port: int, job: dict) -> None:
    """One process of :func:`train_replicated`: join the group, rebuild the data, run :func:`train`."""
    _end_with_parent(job["parent_pid"])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if job["device_type"] == "cuda":  # GPU rank with NCCL; ranks that must share GPUs (a one-GPU check) use gloo,
        count = torch.cuda.device_count()  # as NCCL refuses two ranks on one GPU
        device, backend = torch.device("cuda", rank % count), "nccl" if world <= count else "gloo"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(job["threads"])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, det = job["flags"]
    torch.use_deterministic_algorithms(det, warn_only=True)
    # rank 0 validates and saves while the others wait at their next exchange; longer waits mean a lost worker
    torch.distributed.init_process_group(backend, rank=rank, world_size=world, timeout=DDP_TIMEOUT)
    try:
        # a private copy: tensors passed to spawned processes live in shared memory, and every process
        # stepping the same weights would apply each update once per process
        model = copy.deepcopy(job["model"])
        train(model, _open_slice_spec(job["train"], device), job["train_index"], job["cfg"], job["output_dir"],
              _open_slice_spec(job["val"] if rank == 0 else None, device), job["val_index"], device, job["resume"],
              job["progress"] and rank == 0, job["extra_state"], job["run"])
        _check_ranks_agree(model)
    finally:
        torch.distributed.destroy_process_group()


def _check_ranks_agree(model: torch.nn.Module) -> None:
    """Raise unless every process of the group ends with the same weights (DDP keeps them identical)."""
    flat = torch.cat([p.detach().double().flatten() for p in unwrap(model).parameters()])
    sums = torch.stack([flat.sum(), flat.abs().sum(), (flat * torch.arange(len(flat), device=flat.device)).sum()])
    lo, hi = sums.clone(), sums.clone()
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"the training processes ended with different weights (checksums {lo.tolist()} to "
                           f"{hi.tolist()}): data-parallel training went wrong")


def _worker_failure(err: BaseException) -> BaseException:
    """A failed worker's exception, with the likely cause added where it was killed or timed out waiting for
    another (judged on the error's last line, not on the traceback's source lines above it)."""
    text = str(err)
    last = next((line for line in reversed(text.strip().splitlines()) if line.strip()), "").lower()
    if "sigkill" in last:
        return RuntimeError("A training process was killed (SIGKILL): most likely the out-of-memory killer, as the "
                            "machine ran out of host memory. Lower BATCH_SIZE or use GPUS = 1; the run resumes from "
                            "last.pt.\n" + text)
    if any(k in last for k in ("timed out", "timeout", "watchdog")):
        return RuntimeError(f"A training process waited more than {DDP_TIMEOUT} for another one: that one most "
                            "likely died (out of host memory: the kernel's OOM killer; out of GPU memory) or hung. "
                            "Lower BATCH_SIZE or use GPUS = 1; the run resumes from last.pt.\n" + text)
    return err


def train_replicated(replicas: int, model: torch.nn.Module, train_data: SliceSet, train_index: np.ndarray,
                     cfg: TrainConfig, output_dir: str | os.PathLike, val_data: SliceSet | None = None,
                     val_index: np.ndarray | None = None, device: torch.device | str | None = None,
                     resume: bool = True, progress: bool = True, extra_state: dict | None = None,
                     run: dict | None = None, poll_s: float = 30.0, step: Callable | None = None) -> list[dict]:
    """:func:`train` on ``replicas`` GPUs with DistributedDataParallel, started from a notebook cell.

    One process per GPU (``torch.multiprocessing`` with "spawn", which works in Jupyter because the
    worker lives in this module); each rebuilds the data from the slice cache, takes its share of every
    batch (the batch size is the total over GPUs) and averages gradients with NCCL. Rank 0 validates and
    writes the same ``last.pt``/``best.pt``/history as one GPU, so runs resume on any number of GPUs.
    Epoch rows print here as they finish (the workers' own output goes to the Jupyter server's log).
    On a CPU the processes use gloo, which is how the tests check this path. Afterwards ``model`` is back on
    ``device`` (during training it waits on the CPU, leaving GPU 0's memory to the worker there), holding the
    last epoch's weights when training finished; also after a failure or an interrupt, which stop the workers.
    Workers end when this process does (:func:`_end_with_parent`).

    Returns:
        The history: one dict per epoch.
    """
    if step not in (None, train_step):  # a function defined in a notebook cannot be sent to spawned processes
        warnings.warn("GPUS > 1: the processes run uh.train_step, not the step given", stacklevel=2)
    target = torch.device(device) if device is not None else train_data.device
    if target.type == "cuda" and torch.cuda.device_count() < replicas:
        warnings.warn(f"{replicas} processes share {torch.cuda.device_count()} GPU(s) through gloo: a check of the "
                      "multi-GPU code path, slower than one process.", stacklevel=2)
    memfmt = torch.channels_last
    unwrap(model).cpu()  # GPU 0 must hold as much free memory as GPU 1 while the workers train
    if target.type == "cuda":
        torch.cuda.empty_cache()
    job = {"model": copy.deepcopy(unwrap(model)), "train": _slice_spec(train_data), "val": _slice_spec(val_data),
           "train_index": np.asarray(train_index), "val_index": None if val_index is None else np.asarray(val_index),
           "cfg": cfg, "output_dir": str(output_dir), "resume": resume, "progress": progress,
           "extra_state": extra_state, "run": run, "device_type": target.type, "parent_pid": os.getpid(),
           "threads": max(1, torch.get_num_threads() // replicas),  # CPU ranks share the caller's threads
           "flags": (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
                     torch.are_deterministic_algorithms_enabled())}
    try:
        _run_workers(replicas, job, Path(output_dir), progress, poll_s)
        ck = load_checkpoint(Path(output_dir) / "last.pt")
        unwrap(model).load_state_dict(ck["model"])
        return ck["history"]
    finally:  # on success and failure alike, the notebook's model is back on its device
        unwrap(model).to(target, memory_format=memfmt)


def _run_workers(replicas: int, job: dict, out: Path, progress: bool, poll_s: float) -> None:
    """Start :func:`_ddp_worker` ``replicas`` times and wait, printing epoch rows as they are written; an interrupt
    or a failed worker stops them all, so none goes on writing, and raises what went wrong."""
    log = out / "history.json"
    shown = len(json.loads(log.read_text())) if log.exists() else 0  # rows of an earlier call are not news
    ctx = torch.multiprocessing.start_processes(_ddp_worker, args=(replicas, _free_port(), job),
                                                nprocs=replicas, join=False, start_method="spawn")
    try:
        while not ctx.join(timeout=poll_s):
            rows = json.loads(log.read_text()) if log.exists() else []
            for row in rows[shown:] if progress else []:
                print(f"epoch {row['epoch']}: train CE {row['train_ce']:.3f}, Dice loss {row['train_dice_loss']:.3f}, "
                      f"{row['slices_per_second']:.0f} slices/s")
            shown = max(shown, len(rows))
    except BaseException as err:
        for proc in ctx.processes:  # stop the workers still alive, and wait for them
            if proc.is_alive():
                proc.terminate()
        for proc in ctx.processes:
            proc.join(timeout=30)
        failure = _worker_failure(err)
        if failure is err:
            raise
        raise failure from err


def train_stage2(train_cases: Sequence[CachedCase], val_cases: Sequence[CachedCase], settings: dict, epochs: int,
                 out_dir: str | os.PathLike, run: dict, device: torch.device,
                 step: Callable | None = None) -> tuple[Stage2, list[dict], int]:
    """Stage 2 of the cascade: a fresh U-Net trained on the cases' liver boxes (notebook: "Train", stage 2).

    It trains as stage 1 does (:func:`train`), on the recipe's stage-2 settings (:func:`recipe_train_config`):
    random ``PATCH_SIZE`` windows of the boxes where set, with as many steps per epoch as show the pixels of the
    whole boxes (:func:`patch_steps`). Its checkpoints go to ``out_dir/stage2``; the one ``EVAL_CHECKPOINT``
    names is loaded for inference.

    Args:
        train_cases, val_cases: stage 1's cached cases (their liver boxes are cut here, :func:`roi_cases`).
        settings: the resolved settings (:func:`resolve_settings`).
        epochs: stage 2's share of the budget (:func:`cascade_plan`).
        run: stage 1's run identity (:func:`run_identity`); stage 2's adds ``"stage": 2``.
        step: the optimizer step (:func:`train`'s ``step``).
    Returns:
        (the stage for :func:`predict_cascade`, the history, the epoch of the loaded checkpoint counted from 1).
    """
    s, rec = settings, settings["RECIPE_SETTINGS"]
    data, index, val_data, val_index = make_slice_sets(roi_cases(train_cases), roi_cases(val_cases), s, device)
    set_determinism(s["SEED"], s["DETERMINISTIC"])
    model = UNet(s["CONTEXT_SLICES"], 3, base_channels=s["BASE_CHANNELS"], depth=s["DEPTH"])
    steps = patch_steps(s["STEPS_PER_EPOCH"] or max(1, len(index) // s["BATCH_SIZE"]), s["ROI_SIZE"], s["PATCH_SIZE"])
    cfg = recipe_train_config(rec, epochs, s["BATCH_SIZE"], s["LR"], s["SEED"], steps, stage=2,
                              window=s["PATCH_SIZE"])
    out = Path(out_dir) / "stage2"
    history = train(model, data, index, cfg, out, val_data, val_index, device=device, resume=s["RESUME"],
                    run={**run, "stage": 2}, replicas=s["GPUS"], step=step)
    ckpt = load_checkpoint(out / f"{s['EVAL_CHECKPOINT']}.pt", map_location=device)
    model.load_state_dict(ckpt["model"])
    stage2 = Stage2(model, s["ROI_SIZE"], core_mm=s["CASCADE_CORE_MM"], mirror=rec["stage2_mirror"],
                    average_liver=rec["average_liver"])
    return stage2, history, ckpt["epoch"] + 1


def asdict_plain(obj: Any) -> dict:
    """A dataclass as a dict of plain Python values (JSON- and weights_only-safe)."""
    from dataclasses import asdict
    return json.loads(json.dumps(asdict(obj), default=float))


# =============================================================================================
# 7. Evaluation and inference                                     (notebook: "Evaluate", "Inference")
# =============================================================================================

def overlap_counts(pred: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor) -> tuple[int, int, int]:
    """(tp, fp, fn) voxel counts of two masks (NumPy or torch): the one overlap core behind every Dice here."""
    if isinstance(pred, torch.Tensor):
        p, t = pred.bool(), torch.as_tensor(truth).bool()
    else:
        p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    tp = int((p & t).sum())
    return tp, int(p.sum()) - tp, int(t.sum()) - tp


def dice_from_counts(tp: int, fp: int, fn: int, empty: float = float("nan")) -> float:
    """Dice 2tp / (2tp + fp + fn); ``empty`` when both masks are empty."""
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else empty


def dice(pred: np.ndarray, truth: np.ndarray, empty: float = float("nan")) -> float:
    """Dice 2|P∩T| / (|P|+|T|) of two boolean masks; ``empty`` when both are empty."""
    return dice_from_counts(*overlap_counts(pred, truth), empty=empty)


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """(HD95, ASSD) in mm between two non-empty masks; (nan, nan) when either is empty.

    MONAI's definitions (``compute_hausdorff_distance(percentile=95)``,
    ``compute_average_surface_distance(symmetric=True)``; the tests check equality): a surface
    voxel is a mask voxel with a 6-neighbour outside it; HD95 is the larger of the two directed
    95th-percentile surface distances; ASSD is the mean of all surface distances in both
    directions.  (medpy's ``hd95`` takes one percentile over both directions pooled instead.)
    """
    from scipy import ndimage
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    if not p.any() or not t.any():
        return float("nan"), float("nan")
    both = np.argwhere(p | t)
    lo, hi = np.maximum(both.min(0) - 2, 0), both.max(0) + 3
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    p, t = p[box], t[box]
    surf_p = p & ~ndimage.binary_erosion(p, border_value=0)
    surf_t = t & ~ndimage.binary_erosion(t, border_value=0)
    dt_t = ndimage.distance_transform_edt(~surf_t, sampling=spacing)
    dt_p = ndimage.distance_transform_edt(~surf_p, sampling=spacing)
    d_pt, d_tp = dt_t[surf_p], dt_p[surf_t]
    hd95 = max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))
    return float(hd95), float(np.concatenate([d_pt, d_tp]).mean())


CONNECTIVITY_26 = np.ones((3, 3, 3), bool)  # voxels touching by a face, an edge or a corner are connected


def postprocess(pred: np.ndarray, spacing: Sequence[float] | None = None, min_tumor_ml: float = 0.0) -> np.ndarray:
    """Keep the largest 26-connected foreground (label ≥ 1) component that holds liver; labels inside unchanged.

    Everything outside that component becomes background: stray liver islands and tumour that
    touches no kept liver.  Tumour inside or attached to the kept liver stays tumour (the size of a
    component counts its liver and tumour voxels).  A tumour-only component is never kept over
    one with liver, however large; a prediction without any liver keeps its largest tumour
    component.  An empty prediction is returned as a copy.  With ``min_tumor_ml`` > 0 (and the voxel
    ``spacing`` in mm), tumour components smaller than that then become liver (:func:`drop_small_tumor`).
    """
    from scipy import ndimage
    if min_tumor_ml > 0:
        if spacing is None:
            raise ValueError("postprocess needs the voxel spacing to drop tumour under min_tumor_ml")
        return drop_small_tumor(postprocess(pred), spacing, min_tumor_ml)
    fg = pred >= 1
    if not fg.any():
        return pred.copy()
    lab, n = ndimage.label(fg, structure=CONNECTIVITY_26)
    if n > 1:
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        sizes[0] = 0
        with_liver = np.bincount(lab[pred == 1], minlength=n + 1) > 0
        if with_liver.any():
            sizes[~with_liver] = 0
        fg = lab == sizes.argmax()
    return np.where(fg, pred, 0).astype(np.uint8)


def drop_small_tumor(pred: np.ndarray, spacing: Sequence[float], min_ml: float) -> np.ndarray:
    """``pred`` with every 26-connected tumour (label 2) component under ``min_ml`` mL relabelled liver (1), or
    background where ``pred`` holds no liver at all.

    The default recipe's floor (``min_tumor_ml``: 0.1 mL, a sphere 5.8 mm across) removes specks, most of them
    false lesions (BENCHMARKS.md). ``min_ml`` ≤ 0 returns ``pred`` itself.
    """
    from scipy import ndimage
    if min_ml <= 0:
        return pred
    lab, _ = ndimage.label(pred == 2, structure=CONNECTIVITY_26)
    ml = np.bincount(lab.ravel()) * float(np.prod(spacing)) / 1000.0
    small = np.flatnonzero(ml < min_ml)
    out = pred.copy()
    out[np.isin(lab, small[small > 0])] = 1 if (pred == 1).any() else 0
    return out


LESION_CONNECTIVITY = np.array([[[0, 0, 0], [0, 1, 0], [0, 0, 0]], [[0, 1, 0], [1, 1, 1], [0, 1, 0]],
                                [[0, 0, 0], [0, 1, 0], [0, 0, 0]]], bool)  # face neighbours: scipy's default, LiTS's


def match_lesions(inter: np.ndarray) -> list[tuple[list[int], list[int]]]:
    """LiTS's matching of predicted to reference lesions, merges and splits resolved, from their overlaps.

    The rule of the LiTS evaluation code (``detect_lesions`` in its ``helpers/calc_metric.py``, Bilic et al.
    2019): (1) a predicted lesion that overlaps several reference lesions merges those of them that it overlaps
    more than any other prediction does; (2) every predicted lesion is matched to the (merged) reference lesion it
    overlaps most; (3) the predictions matched to one reference lesion are merged. Ties go to the lower index.

    Args:
        inter: (n_pred, n_ref) voxel counts of each predicted lesion's overlap with each reference lesion.

    Returns:
        One (predicted indices, reference indices) pair per matched group, each side non-empty, ordered by their
        first reference lesion; lesions that overlap nothing are in no group.
    """
    n_pred, n_ref = inter.shape
    owner = inter.argmax(0) if n_pred else np.zeros(n_ref, int)  # per reference: the prediction overlapping it most
    refs: dict[int, list[int]] = {}  # (1) merged reference lesions, keyed by the prediction that merged them
    for g in range(n_ref):
        if n_pred and inter[owner[g], g] > 0:
            refs.setdefault(int(owner[g]), []).append(g)
    groups = sorted(refs.values())
    preds: list[list[int]] = [[] for _ in groups]
    for p in np.flatnonzero(inter.any(1)):  # (2) + (3): each prediction joins the group it overlaps most
        preds[int(np.argmax([inter[p, g].sum() for g in groups]))].append(int(p))
    return [(ps, gs) for ps, gs in zip(preds, groups) if ps]


def lesion_detection(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                     iou_threshold: float = 0.5, hu: np.ndarray | None = None) -> dict:
    """Lesion-level detection of one case, as LiTS counts it (tumour = label 2).

    Lesions are connected tumour components (face neighbours, scipy's default, as in the LiTS evaluation
    code). Predicted and reference lesions are grouped by :func:`match_lesions` (merges and splits resolved);
    a group is *detected* when the union of its predicted lesions and the union of its reference lesions
    overlap with IoU > ``iou_threshold`` (LiTS: 0.5). LiTS counts one true positive per detected group
    (:func:`lesion_rates`). Two places where the published script departs from its own description are not
    copied: some versions take the union against the wrong label ids, and an undetected merged group subtracts
    its merge count from the detections. Any-overlap detection (a lesion touched by one predicted voxel counts)
    is kept beside it as ``detected_any`` / ``n_pred_matched``. With the CT in HU (``hu``, the truth's grid), each
    reference lesion also gets its contrast: its mean HU minus the liver's median (label 1), NaN without liver.

    Returns:
        ``{"lesions": [{"volume_ml", "detected", "detected_any", "iou"[, "contrast_hu"]}, ...] (one per reference
        lesion, ``detected`` when its group is; ``iou`` of its group, 0 outside any), "groups": [{"n_ref", "n_pred",
        "iou", "dice", "detected"}, ...], "n_pred": predicted lesions, "n_pred_matched": those overlapping any
        reference lesion}``.
    """
    from scipy import ndimage
    ref, n_ref = ndimage.label(truth == 2, structure=LESION_CONNECTIVITY)
    hyp, n_hyp = ndimage.label(pred == 2, structure=LESION_CONNECTIVITY)
    ref_size, hyp_size = np.bincount(ref.ravel(), minlength=n_ref + 1), np.bincount(hyp.ravel(), minlength=n_hyp + 1)
    both = (ref > 0) & (hyp > 0)
    inter = np.zeros((n_hyp + 1, n_ref + 1), np.int64)
    np.add.at(inter, (hyp[both], ref[both]), 1)
    inter = inter[1:, 1:]
    groups, iou_of_ref, found = [], np.zeros(n_ref), np.zeros(n_ref, bool)
    for ps, gs in match_lesions(inter):
        common = int(inter[np.ix_(ps, gs)].sum())
        sizes = int(hyp_size[np.add(ps, 1)].sum()) + int(ref_size[np.add(gs, 1)].sum())
        iou = common / (sizes - common)
        detected = iou > iou_threshold  # LiTS: more than half
        groups.append({"n_ref": len(gs), "n_pred": len(ps), "iou": iou, "dice": 2 * common / sizes,
                       "detected": detected})
        iou_of_ref[gs], found[gs] = iou, detected
    voxel_ml = float(np.prod(spacing)) / 1000.0
    lesions = [{"volume_ml": float(ref_size[g + 1] * voxel_ml), "detected": bool(found[g]),
                "detected_any": bool(inter[:, g].any()), "iou": float(iou_of_ref[g])} for g in range(n_ref)]
    if hu is not None and n_ref:
        for les, delta in zip(lesions, lesion_contrasts(hu, truth, components=(ref, n_ref))[1]):
            les["contrast_hu"] = float(delta)
    return {"lesions": lesions, "groups": groups, "n_pred": int(n_hyp), "n_pred_matched": int(inter.any(1).sum())}


def lesion_counts(detection: dict) -> dict:
    """One case's lesion counts (a :func:`lesion_detection` result), the numbers pooled over cases and folds."""
    les, found = detection["lesions"], [g for g in detection["groups"] if g["detected"]]
    return {"n_lesions": len(les), "n_lesions_detected_any": sum(x["detected_any"] for x in les),
            "n_pred_lesions": detection["n_pred"], "n_pred_lesions_matched": detection["n_pred_matched"],
            "n_lesion_groups_detected": len(found), "lesion_dice_sum": float(sum(g["dice"] for g in found))}


LESION_COUNT_KEYS = ("n_lesions", "n_lesions_detected_any", "n_pred_lesions", "n_pred_lesions_matched",
                     "n_lesion_groups_detected", "lesion_dice_sum")  # lesion_counts' keys, summed by lesion_rates


def lesion_rates(counts: Sequence[dict]) -> dict:
    """Lesion recall, precision, F1 and Dice pooled over cases (:func:`lesion_counts` of each).

    LiTS's detection (IoU > 0.5 after merges and splits), counted as LiTS counts it: one true positive per
    detected group, so recall = detected groups / reference lesions and precision = detected groups /
    predicted lesions (a lesion predicted in two pieces costs precision, two lesions covered by one prediction
    cost recall); ``lesion_dice``: mean Dice of the detected groups (LiTS's "segmentation of detected lesions").
    ``*_any_overlap``: a reference lesion touched by any predicted voxel counts as found, a predicted lesion
    touching any reference lesion as right. NaN where a denominator is 0; F1 as :func:`_f1`.
    """
    tot = {k: sum(c[k] for c in counts) for k in LESION_COUNT_KEYS}
    out = {}
    for sfx, found, hit in (("", "n_lesion_groups_detected", "n_lesion_groups_detected"),
                            ("_any_overlap", "n_lesions_detected_any", "n_pred_lesions_matched")):
        recall, precision = _ratio(tot[found], tot["n_lesions"]), _ratio(tot[hit], tot["n_pred_lesions"])
        out.update({f"lesion_recall{sfx}": recall, f"lesion_precision{sfx}": precision,
                    f"lesion_f1{sfx}": _f1(precision, recall)})
    out["lesion_dice"] = _ratio(tot["lesion_dice_sum"], tot["n_lesion_groups_detected"])
    out["n_lesions"], out["n_pred_lesions"] = tot["n_lesions"], tot["n_pred_lesions"]
    return out


LESION_VOLUME_BINS = ("<1 mL", "1-10 mL", ">10 mL")  # reference lesion volume v: v < 1, 1 ≤ v ≤ 10, v > 10


def lesion_volume_bin(volume_ml: float) -> str:
    """The name of a lesion's volume bin (:data:`LESION_VOLUME_BINS`)."""
    return "<1 mL" if volume_ml < 1 else ("1-10 mL" if volume_ml <= 10 else ">10 mL")


def _ratio(num: float, den: float) -> float:
    """num / den, NaN when den is 0."""
    return float(num / den) if den else float("nan")


def _f1(precision: float, recall: float) -> float:
    """Harmonic mean; 0 when one side is 0 and the other 0 or undefined (nothing found, or only false
    positives: 2TP / (2TP + FP + FN) = 0); NaN only when both are undefined (no lesions, none predicted)."""
    if math.isnan(precision) and math.isnan(recall):
        return float("nan")
    p, r = (0.0 if math.isnan(v) else v for v in (precision, recall))
    return _ratio(2 * p * r, p + r) if p + r else 0.0


def lesion_summary(results: Sequence[dict]) -> dict:
    """:func:`lesion_rates` of some cases' :func:`lesion_detection` results, with recall by reference lesion volume
    (< 1 mL, 1–10 mL, > 10 mL; the share of a bin's lesions whose group is detected; NaN for an empty bin) and by
    contrast group (:data:`CONTRAST_GROUPS`, where the lesions carry ``contrast_hu``), and the counts of each."""
    lesions = [les for r in results for les in r["lesions"]]
    binned = {name: [les for les in lesions if lesion_volume_bin(les["volume_ml"]) == name]
              for name in LESION_VOLUME_BINS}
    measured = [les for les in lesions if les.get("contrast_hu") is not None and not math.isnan(les["contrast_hu"])]
    groups = contrast_group(np.array([les["contrast_hu"] for les in measured]))
    by_contrast = {name: [les for les, g in zip(measured, groups) if g == k] for k, name in enumerate(CONTRAST_GROUPS)}
    out = lesion_rates([lesion_counts(r) for r in results])
    for key, parts in (("volume", binned), ("contrast", by_contrast)):
        out[f"lesion_recall_by_{key}"] = {k: _ratio(sum(les["detected"] for les in v), len(v))
                                          for k, v in parts.items()}
        out[f"lesion_count_by_{key}"] = {k: len(v) for k, v in parts.items()}
    return out


def bootstrap_ci(values: Iterable[float], n_boot: int = 10000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over cases (NaNs dropped; (nan, nan) when none left)."""
    x = np.asarray(_finite(values), float)
    if not len(x):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boot = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(boot, tail)), float(np.percentile(boot, 100 - tail))


def inference_batch_size(device: torch.device | str, image_size: int = 128) -> int:
    """Slices per forward pass when none is given: 32 on a GPU; on the CPU 8 at ≤ 128² and 1 above.

    Measured in BENCHMARKS.md (inference): on 2 CPU cores the quick U-Net is fastest at 8 slices,
    the full one at 1 (its 256² activations of several slices no longer fit in cache).
    """
    if torch.device(device).type != "cpu":
        return 32
    return 8 if image_size <= 128 else 1


@torch.no_grad()
def slice_probabilities(model: torch.nn.Module, slices: np.ndarray, out_shape: tuple[int, int], context: int,
                        device: torch.device | str,
                        batch_size: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """The softmax of ``model`` on a (Z, S, S) windowed stack, batch by batch, resized to ``out_shape``.

    The logits are resized to the original in-plane grid before the softmax (smoother than resizing a
    label map). ``batch_size`` None picks ``inference_batch_size(device)``.

    Yields:
        (index of the batch's first slice, (B, C, X, Y) float32 probabilities on ``device``).
    """
    device = torch.device(device)
    batch_size = batch_size or inference_batch_size(device, max(slices.shape[1:]))
    model.eval()
    neigh = context_indices(slices.shape[0], context)
    stack = torch.from_numpy(np.asarray(slices, np.float32))
    for start in range(0, slices.shape[0], batch_size):
        x = stack[torch.from_numpy(neigh[start:start + batch_size])].to(device)
        with autocast(device, True):
            logits = model(x.contiguous(memory_format=torch.channels_last))
        logits = F.interpolate(logits.float(), size=out_shape, mode="bilinear", align_corners=False)
        yield start, torch.softmax(logits, 1)


def predict_slices(model: torch.nn.Module, slices: np.ndarray, out_shape: tuple[int, int], context: int,
                   device: torch.device | str, batch_size: int | None = None,
                   foreground: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Label every slice of a (Z, S, S) windowed stack, upsampled to ``out_shape``: returns (X, Y, Z) uint8.

    The argmax of :func:`slice_probabilities`. With ``foreground``, also the (X, Y, Z) float16 probability
    of liver or tumour (1 - background), which :func:`predict_cascade` averages with stage 2's.
    """
    nz = slices.shape[0]
    out = np.zeros((*out_shape, nz), np.uint8)
    fg = np.zeros((*out_shape, nz), np.float16) if foreground else None
    for start, probs in slice_probabilities(model, slices, out_shape, context, device, batch_size):
        out[:, :, start:start + len(probs)] = probs.argmax(1).permute(1, 2, 0).to(torch.uint8).cpu().numpy()
        if fg is not None:
            fg[:, :, start:start + len(probs)] = (1 - probs[:, 0]).permute(1, 2, 0).half().cpu().numpy()
    return (out, fg) if foreground else out


class MirrorAverage(torch.nn.Module):
    """Test-time mirroring (nnU-Net's): the log of ``model``'s softmax averaged over the input and its mirrors
    left-right, up-down and both, each flipped back. For a network trained on mirrored inputs
    (``Augmentation.mirror``); one trained without mirrors scores worse with it (BENCHMARKS.md)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.model(x).float(), 1)
        for dims in ((-1,), (-2,), (-2, -1)):  # a mirror's output flipped back onto the input's pixels
            probs = probs + torch.softmax(self.model(x.flip(dims)).float(), 1).flip(dims)
        return torch.log((probs / 4).clamp_min(1e-8))


@dataclass
class Stage2:
    """The cascade's second stage: a U-Net on the liver box (a ``roi_size`` window), the box margin, how deep
    inside stage 1's liver its calls of background are overruled, whether its softmax is averaged over
    mirrored boxes, and whether its liver call is averaged with stage 1's (:func:`predict_cascade`)."""

    model: torch.nn.Module
    roi_size: int
    margin_mm: float = ROI_MARGIN_MM
    core_mm: float | None = CASCADE_CORE_MM  # stage 1's liver this far inside its edge stays liver; None: off
    mirror: bool = False  # average over the box and its 3 mirrors (MirrorAverage): 4x the forward passes
    average_liver: bool = False  # liver-or-not from the mean of both stages' probabilities (needs stage 1's)

    def net(self) -> torch.nn.Module:
        """The network that labels the boxes: the model, averaged over mirrors where ``mirror`` says so."""
        return MirrorAverage(self.model) if self.mirror else self.model


def cascade_input(stage1_pred: np.ndarray, windowed_full: np.ndarray, spacing: Sequence[float],
                  stage2: Stage2, liver: np.ndarray | None = None) -> tuple[tuple[int, ...] | None, np.ndarray | None]:
    """What stage 2 receives: stage 1's liver box and its (Zb, R, R) full-resolution slices.

    ``liver``: stage 1's post-processed liver mask (``postprocess(stage1_pred) >= 1``) when the caller
    already has it. (None, None) when stage 1 found no liver.
    """
    liver = postprocess(stage1_pred) >= 1 if liver is None else liver
    box = liver_box(liver, spacing, stage2.margin_mm, min_side=stage2.roi_size)
    if box is None:
        return None, None
    return box, network_slices(crop_box(windowed_full, box), stage2.roi_size)


def combine_stages(stage2_probs: torch.Tensor, stage1_fg: torch.Tensor) -> torch.Tensor:
    """Labels from stage 2's (B, 3, X, Y) softmax with its liver-or-not call averaged with stage 1's (B, X, Y)
    foreground probability: foreground where the mean of the two is at least 0.5, there tumour where stage 2
    finds tumour likelier than liver (also where stage 2 alone would have called background). Stage 1, trained on
    whole slices, keeps a say in where the liver ends (BENCHMARKS.md, "Real CT livers")."""
    foreground = (1 - stage2_probs[:, 0] + stage1_fg) / 2 >= 0.5
    tumor = stage2_probs[:, 2] > stage2_probs[:, 1]
    return (foreground.to(torch.uint8) * (1 + tumor.to(torch.uint8))).to(torch.uint8)


def label_box(stage2: Stage2, crop: np.ndarray, box: Sequence[int], context: int, device: torch.device | str,
              batch_size: int | None = None, *, stage1_fg: np.ndarray | None = None) -> np.ndarray:
    """Stage 2's (X1-X0, Y1-Y0, Z1-Z0) labels of a liver box (:func:`cascade_input`'s crop), with its liver call
    averaged with stage 1's foreground probability (:func:`combine_stages`) where ``stage2.average_liver``."""
    x0, x1, y0, y1, z0, z1 = box
    if not stage2.average_liver:
        return predict_slices(stage2.net(), crop, (x1 - x0, y1 - y0), context, device, batch_size)
    inner = np.zeros((x1 - x0, y1 - y0, z1 - z0), np.uint8)
    for start, probs in slice_probabilities(stage2.net(), crop, (x1 - x0, y1 - y0), context, device, batch_size):
        fg1 = torch.from_numpy(np.asarray(stage1_fg[x0:x1, y0:y1, z0 + start:z0 + start + len(probs)], np.float32))
        labels = combine_stages(probs, fg1.permute(2, 0, 1).to(probs.device))  # on the device: only labels move
        inner[:, :, start:start + len(probs)] = labels.permute(1, 2, 0).cpu().numpy()
    return inner


def predict_cascade(stage1_pred: np.ndarray, windowed_full: np.ndarray, spacing: Sequence[float], stage2: Stage2,
                    context: int, device: torch.device | str, batch_size: int | None = None, *,
                    stage1_fg: np.ndarray | None = None) -> np.ndarray:
    """Refine a stage-1 label volume inside its liver box at full resolution (Christ et al. 2016).

    Stage 1's largest liver component gives the box (plus ``margin_mm``, at least ``roi_size``
    pixels wide); its slices are cropped from the full-resolution windowed volume (resized to
    ``roi_size`` only when the box is larger), segmented by stage 2 and pasted back at the box's
    own resolution. Outside the box the result is background. With ``stage2.average_liver`` and stage 1's
    foreground probability, liver-or-not in the box is the mean of both stages' (:func:`combine_stages`).
    Where stage 2 calls background more than ``stage2.core_mm`` inside stage 1's liver (in-plane,
    :func:`keep_liver_core`), the voxel stays liver: on a real CT, stage 2 models trained on synthetic boxes
    dropped whole parts of a liver that stage 1 had found.

    Args:
        stage1_pred: (X, Y, Z) labels from stage 1 (post-processed or not).
        windowed_full: (X, Y, Z) windowed image in [0, 1] at full resolution.
        spacing: voxel size in mm.
        stage2: the stage-2 model and box settings.
        stage1_fg: (X, Y, Z) stage 1's probability of liver or tumour (``predict_slices(..., foreground=True)``);
            needed where ``stage2.average_liver``.
    """
    if stage2.average_liver and stage1_fg is None:
        raise ValueError("Stage2(average_liver=True) averages stage 1's liver probability with stage 2's: pass "
                         "stage1_fg from predict_slices(stage1, ..., foreground=True)")
    if stage1_fg is not None and stage1_fg.shape != stage1_pred.shape:
        raise ValueError(f"stage1_fg has shape {stage1_fg.shape}, stage 1's labels {stage1_pred.shape}: pass the "
                         "foreground that predict_slices returned with those labels")
    liver = postprocess(stage1_pred) >= 1  # once: the box and the kept interior both come from it
    box, crop = cascade_input(stage1_pred, windowed_full, spacing, stage2, liver)
    if box is None:
        return stage1_pred
    x0, x1, y0, y1, z0, z1 = box
    inner = label_box(stage2, crop, box, context, device, batch_size, stage1_fg=stage1_fg)
    out = np.zeros_like(stage1_pred)
    out[x0:x1, y0:y1, z0:z1] = inner
    return keep_liver_core(out, liver, spacing, stage2.core_mm)


def liver_core(liver: np.ndarray, spacing: Sequence[float], depth_mm: float) -> np.ndarray:
    """The voxels of an (X, Y, Z) mask lying more than ``depth_mm`` inside its edge, in their own slice.

    Distances are in-plane (a 2D distance transform per slice, with the pixel spacing), so the
    slice thickness does not matter; the image border counts as outside the mask. ``depth_mm`` None or
    below 0 gives an empty core.
    """
    from scipy import ndimage
    if liver.ndim != 3:
        raise ValueError(f"liver_core needs an (X, Y, Z) mask, got shape {liver.shape}")
    core = np.zeros(liver.shape, bool)
    if depth_mm is None or depth_mm < 0:
        return core
    for z in np.flatnonzero(liver.any(axis=(0, 1))):
        inside = np.pad(liver[:, :, z], 1)  # the image border counts as outside the liver
        core[:, :, z] = (ndimage.distance_transform_edt(inside, sampling=spacing[:2]) > depth_mm)[1:-1, 1:-1]
    return core


def keep_liver_core(stage2_labels: np.ndarray, stage1_liver: np.ndarray, spacing: Sequence[float],
                    depth_mm: float | None) -> np.ndarray:
    """Stage 2's labels, with stage 1's liver more than ``depth_mm`` inside its edge (:func:`liver_core`) as liver
    where stage 2 says background: stage 2 refines the edge and calls the tumour, it cannot erase the interior."""
    out = stage2_labels.copy()
    out[liver_core(stage1_liver, spacing, depth_mm) & (out == 0)] = 1
    return out


def tumor_burden(labels: np.ndarray) -> float:
    """LiTS's tumour burden: tumour voxels / liver-with-tumour voxels (label 2 / label ≥ 1); 0 without liver or
    tumour (LiTS's script gives a prediction without label 1 a burden of 9001, a penalty, not a burden)."""
    liver = int((labels >= 1).sum())
    return int((labels == 2).sum()) / liver if liver else 0.0


POOLED_KEYS = {"liver": lambda p, t: (p == 1, t == 1), "tumor": lambda p, t: (p == 2, t == 2),
               "liver_lits": lambda p, t: (p >= 1, t >= 1)}  # global Dice: counts pooled over cases


def overlap_scores(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> dict:
    """The overlap part of :func:`score_case`: Dice in each convention, the tp/fp/fn counts behind global Dice
    (``tp_<name>``, ``fp_<name>``, ``fn_<name>`` for each of :data:`POOLED_KEYS`), tumour volumes and burden."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    has_tumor = bool((truth == 2).any())
    row: dict[str, Any] = {"has_tumor": has_tumor}
    for key, masks in POOLED_KEYS.items():
        row[f"tp_{key}"], row[f"fp_{key}"], row[f"fn_{key}"] = overlap_counts(*masks(pred, truth))
    counts = {key: [row[f"{x}_{key}"] for x in ("tp", "fp", "fn")] for key in POOLED_KEYS}
    row.update(dice_liver=dice_from_counts(*counts["liver"]), dice_liver_lits=dice_from_counts(*counts["liver_lits"]),
               dice_tumor=dice_from_counts(*counts["tumor"]) if has_tumor else float("nan"),
               dice_tumor_lits=dice_from_counts(*counts["tumor"], empty=1.0),
               tumor_ml=float((truth == 2).sum() * voxel_ml), pred_tumor_ml=float((pred == 2).sum() * voxel_ml),
               fp_tumor_ml=float(counts["tumor"][1] * voxel_ml),
               tumor_burden_error=tumor_burden(pred) - tumor_burden(truth))
    row["dice_tumor_all_cases"] = row["dice_tumor"] if has_tumor else (
        0.0 if row["pred_tumor_ml"] > 0 else float("nan"))
    row["dice_mean"] = (row["dice_liver"] + row["dice_tumor"]) / 2 if has_tumor else float("nan")
    row["tumor_volume_ratio"] = _ratio(row["pred_tumor_ml"], row["tumor_ml"])
    row["tumor_rvd"] = row["tumor_volume_ratio"] - 1.0  # signed relative volume difference, (P - T) / T
    return row


def score_case(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], lesions: dict | None = None) -> dict:
    """3D metrics of one case (labels 0/1/2 on the same grid); conventions in README "How evaluation is computed".

    Args:
        pred, truth: (X, Y, Z) label volumes.
        spacing: voxel size in mm.
        lesions: this case's :func:`lesion_detection` result when already computed.

    Returns:
        ``dice_liver`` (label 1), ``dice_tumor`` (label 2; NaN on a tumour-free case), ``dice_tumor_lits``
        (LiTS: a tumour-free case scores 1 with no predicted tumour, 0 with any), ``dice_tumor_all_cases``
        (nnU-Net: a tumour-free case scores 0 with any predicted tumour, NaN with none), ``dice_liver_lits``
        (label ≥ 1), ``dice_mean`` (mean of liver and tumour Dice; NaN on a tumour-free case), the tp/fp/fn
        counts, tumour volumes in mL (true, predicted, false positive), ``tumor_volume_ratio`` (predicted / true),
        ``tumor_rvd`` ((predicted - true) / true), ``tumor_burden_error`` (predicted - true LiTS tumour burden),
        HD95/ASSD in mm for label ≥ 1 (``*_liver_lits_mm``) and label 2 (NaN where either mask is empty), and
        the lesion counts of :func:`lesion_counts`.
    """
    row = overlap_scores(pred, truth, spacing)
    row["hd95_liver_lits_mm"], row["assd_liver_lits_mm"] = surface_distances(pred >= 1, truth >= 1, spacing)
    row["hd95_tumor_mm"], row["assd_tumor_mm"] = (surface_distances(pred == 2, truth == 2, spacing)
                                                  if row["has_tumor"] else (float("nan"), float("nan")))
    row.update(lesion_counts(lesions if lesions is not None else lesion_detection(pred, truth, spacing)))
    return row


RAW_DICE_KEYS = ("dice_liver", "dice_tumor", "dice_tumor_lits", "dice_tumor_all_cases", "dice_liver_lits", "dice_mean")
RAW_KEYS = (*RAW_DICE_KEYS, "fp_tumor_ml", *(f"{x}_{k}" for k in POOLED_KEYS for x in ("tp", "fp", "fn")))  # before
# post-processing: each per-case row keeps these with the suffix _raw


def _score_with_raw(raw: np.ndarray, final: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                    lesions: dict | None = None) -> dict:
    """score_case of the final prediction, with the raw (not post-processed) overlap values beside it (``_raw``)."""
    row = score_case(final, truth, spacing, lesions)
    raw_row = overlap_scores(raw, truth, spacing) if raw is not final else row
    row.update({f"{k}_raw": raw_row[k] for k in RAW_KEYS})
    return row


def _predict_stage1(model: torch.nn.Module, slices: np.ndarray, out_shape: tuple[int, int], context: int,
                    device: torch.device | str, stage2: Stage2 | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Stage 1's labels, and its foreground probability where ``stage2`` averages the two stages' liver."""
    if stage2 is not None and stage2.average_liver:
        return predict_slices(model, slices, out_shape, context, device, foreground=True)
    return predict_slices(model, slices, out_shape, context, device), None


def evaluate(model: torch.nn.Module, cases: Sequence[CachedCase], context: int, device: torch.device | str,
             postprocess_pred: bool = True, keep_predictions: bool = True, progress: bool = True,
             stage2: Stage2 | None = None, save_dir: str | os.PathLike | None = None,
             min_tumor_ml: float = 0.0) -> dict:
    """Full-volume 3D evaluation of each case on its original (canonical) grid, LiTS-style.

    Used in the notebook section "Evaluate".  Every slice is predicted with its 2.5D context,
    logits are resized back to the original in-plane size, and each case is scored in 3D with
    its voxel spacing by :func:`score_case`; :func:`summarize` gives the means, pooled Dice,
    lesion detection and bootstrap intervals.

    With ``stage2`` (the cascade), stage 1's prediction is refined in its liver box by
    :func:`predict_cascade`; this decodes each validation NIfTI once more for its full-resolution
    slices (as it does for a case with tumour, for the contrast of each lesion).  With ``save_dir``, every
    prediction is written as ``<case>_pred.nii.gz`` in its input's own grid and header (:func:`save_prediction`),
    for re-scoring with any other tool.

    Returns:
        ``{"per_case": [...], "summary": {...}, "lesions": [...], "predictions": {case_id: (X, Y, Z) uint8}}``;
        per-case values after :func:`postprocess` (with the ``min_tumor_ml`` floor) when ``postprocess_pred``,
        the values before it beside them (suffixed ``_raw``); ``lesions``: :func:`lesion_detection` per case.
    """
    rows, preds, lesions = [], {}, []
    for c in tqdm(cases, desc="evaluate (3D)", unit="case", disable=not progress):
        truth, spacing = c.label_full, c.meta["spacing"]
        raw, fg = _predict_stage1(model, c.image, truth.shape[:2], context, device, stage2)
        hu = load_case(c.meta["image_path"]).image if stage2 is not None or (truth == 2).any() else None
        if stage2 is not None:  # the full-resolution slices of the liver box
            raw = predict_cascade(raw, window_hu(hu, c.meta["hu_window"]), spacing, stage2, context, device,
                                  stage1_fg=fg)
        final = postprocess(raw, spacing, min_tumor_ml) if postprocess_pred else raw
        lesions.append({"case": c.case_id, **lesion_detection(final, truth, spacing, hu=hu)})
        rows.append({"case": c.case_id, **_score_with_raw(raw, final, truth, spacing, lesions[-1])})
        if save_dir is not None:
            save_prediction(final, c.meta["image_path"], Path(save_dir) / f"{c.case_id}_pred.nii.gz")
        if keep_predictions:
            preds[c.case_id] = final
    return {"per_case": rows, "summary": summarize(rows, lesions), "lesions": lesions,
            "predictions": preds}


def _finite(values: Iterable[float]) -> list[float]:
    """The values that are numbers (not None, not NaN)."""
    return [float(v) for v in values if v is not None and not math.isnan(v)]


MEAN_KEYS = ("dice_liver", "dice_tumor", "dice_tumor_lits", "dice_tumor_all_cases", "dice_liver_lits", "dice_mean",
             "tumor_rvd", "hd95_liver_lits_mm", "assd_liver_lits_mm", "hd95_tumor_mm", "assd_tumor_mm")


def summarize(rows: list[dict], lesions: Sequence[dict] | None = None) -> dict:
    """Per-case means with 95 % bootstrap intervals, global Dice, tumour burden, volume ratio, lesion detection.

    Each per-case mean skips the cases where its metric is undefined (NaN or null): ``dice_tumor``,
    ``dice_mean`` and ``tumor_rvd`` use the cases with tumour, ``dice_tumor_all_cases`` every case but those
    with neither true nor predicted tumour, ``dice_tumor_lits`` every case; HD95/ASSD are averaged over the
    cases where both masks are non-empty, and the cases left out are counted beside them
    (``n_<key>_undefined``). Global Dice (``dice_<name>_global``) divides the tp/fp/fn counts summed over
    cases; ``tumor_burden_rmse`` / ``tumor_burden_max_error`` are the root mean square and the largest absolute
    error of the per-case tumour burden (LiTS reports the RMSE and the largest signed true − predicted one);
    lesion rates pool the cases' counts (:func:`lesion_rates`), recall by lesion volume needs ``lesions``
    (:func:`lesion_detection` results). ``ci95[key]`` is a bootstrap over cases.
    """
    s: dict[str, Any] = {"n_cases": len(rows), "n_cases_with_tumor": sum(r["has_tumor"] for r in rows)}
    per_case = {k: [r[k] for r in rows] for k in MEAN_KEYS}
    raw = bool(rows) and all("dice_liver_raw" in r for r in rows)
    per_case.update({f"{k}_raw": [r[f"{k}_raw"] for r in rows] for k in RAW_DICE_KEYS if raw})
    for sfx in ("", "_raw") if raw else ("",):
        per_case[f"fp_tumor_ml_tumor_free_cases{sfx}"] = [r[f"fp_tumor_ml{sfx}"] for r in rows if not r["has_tumor"]]
        for key in POOLED_KEYS:
            s[f"dice_{key}_global{sfx}"] = dice_from_counts(*(sum(r[f"{x}_{key}{sfx}"] for r in rows)
                                                              for x in ("tp", "fp", "fn")))
    for key, values in per_case.items():
        finite = _finite(values)
        s[key] = float(np.mean(finite)) if finite else float("nan")
    for key in ("hd95_liver_lits_mm", "assd_liver_lits_mm", "hd95_tumor_mm", "assd_tumor_mm"):
        relevant = rows if "liver" in key else [r for r in rows if r["has_tumor"]]
        s[f"n_{key}_undefined"] = sum(r[key] is None or math.isnan(r[key]) for r in relevant)
    ratios = _finite(r["tumor_volume_ratio"] for r in rows)
    s["median_tumor_volume_ratio"] = float(np.median(ratios)) if ratios else float("nan")
    burden = np.asarray(_finite(r["tumor_burden_error"] for r in rows))
    s["tumor_burden_rmse"] = float(np.sqrt(np.mean(burden ** 2))) if len(burden) else float("nan")
    s["tumor_burden_max_error"] = float(np.abs(burden).max()) if len(burden) else float("nan")
    s.update(lesion_summary(lesions) if lesions is not None else lesion_rates(rows))
    s["ci95"] = {k: list(bootstrap_ci(v)) for k, v in per_case.items()}
    return s


def save_prediction(pred: np.ndarray, image_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write a canonical (X, Y, Z) label volume in the grid and header of the CT it was predicted from.

    The file carries the input's affine and header (dtype uint8, no scaling), so it opens aligned
    over the CT in 3D Slicer or ITK-SNAP and can be re-scored with any tool.  Written atomically.
    """
    src = nib.load(str(image_path))
    native = from_canonical(pred, src.affine).astype(np.uint8)
    if native.shape != src.shape[:3]:
        raise ValueError(f"{image_path}: prediction of shape {native.shape} does not fit the image {src.shape}")
    hdr = src.header.copy()
    hdr.set_data_dtype(np.uint8)
    img = nib.Nifti1Image(native, src.affine, hdr)
    img.header.set_slope_inter(1, 0)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, lambda tmp: nib.save(img, str(tmp)))
    return out_path


def predict_volume(model: torch.nn.Module, nifti_path: str | os.PathLike, image_size: int, context: int,
                   hu_window: Sequence[float] = DEFAULT_HU_WINDOW, device: torch.device | str = "cpu",
                   postprocess_pred: bool = True, out_path: str | os.PathLike | None = None,
                   stage2: Stage2 | None = None, min_tumor_ml: float = 0.0) -> np.ndarray:
    """Segment one CT NIfTI file; return labels in the input's own grid (and save them as NIfTI).

    Used in the notebook section "Inference".  The saved file carries the input's affine and
    header (:func:`save_prediction`), so it opens aligned over the CT in 3D Slicer or ITK-SNAP.

    Args:
        model: trained U-Net.
        nifti_path: CT volume (any orientation).
        image_size, context, hu_window: as used for training.
        device: where to run.
        postprocess_pred: keep the largest connected liver component (:func:`postprocess`).
        min_tumor_ml: with ``postprocess_pred``, tumour components under this many mL become liver.
        out_path: where to write the label NIfTI (uint8), or None.
        stage2: the cascade's second stage, or None.

    Returns:
        (X, Y, Z) uint8 labels in the input file's voxel order.
    """
    case = load_case(nifti_path)
    windowed = window_hu(case.image, hu_window)
    slices = network_slices(windowed, image_size)
    pred, fg = _predict_stage1(model, slices, case.image.shape[:2], context, device, stage2)
    if stage2 is not None:
        pred = predict_cascade(pred, windowed, case.spacing, stage2, context, device, stage1_fg=fg)
    if postprocess_pred:
        pred = postprocess(pred, case.spacing, min_tumor_ml)
    if out_path is not None:
        save_prediction(pred, nifti_path, out_path)
    return from_canonical(pred, case.source_affine)


@dataclass
class Run:
    """A trained run rebuilt from its folder by :func:`load_run`: both stages, the settings and the device."""

    model: torch.nn.Module
    stage2: Stage2 | None
    settings: dict
    device: torch.device

    def predict(self, ct_path: str | os.PathLike, out_path: str | os.PathLike | None = None) -> np.ndarray:
        """Labels (0 background, 1 liver, 2 tumour) of one CT file in its own voxel grid, post-processed as the
        run's recipe says; with ``out_path``, also written there as an aligned NIfTI (:func:`predict_volume`)."""
        s, rec = self.settings, self.settings["RECIPE_SETTINGS"]
        return predict_volume(self.model, ct_path, s["IMAGE_SIZE"], s["CONTEXT_SLICES"], s["HU_WINDOW"],
                              self.device, postprocess_pred=rec["postprocess"], out_path=out_path,
                              stage2=self.stage2, min_tumor_ml=rec["min_tumor_ml"])


def _network_from(path: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The U-Net stored in a checkpoint, in eval mode on ``device``, and the checkpoint."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: is {path.parent} the OUTPUT_DIR of a finished run (or, with "
                                "FOLD, its fold_k folder)?")
    ck = load_checkpoint(path, map_location="cpu")
    if not isinstance(ck, dict) or not {"model", "model_hparams"} <= set(ck):
        raise ValueError(f"{path} is not a checkpoint written by uh.train (no network and its sizes in it)")
    model = UNet(**ck["model_hparams"])
    model.load_state_dict(ck["model"])
    return model.to(device, memory_format=torch.channels_last).eval(), ck


def load_run(output_dir: str | os.PathLike, device: str = "auto", checkpoint: str | None = None) -> Run:
    """Everything a prediction needs, rebuilt from a run's folder (the notebook's ``OUTPUT_DIR``, or its
    ``fold_k``): stage 1, stage 2 where the run trained one, the settings and the post-processing.

    Args:
        output_dir: the run's folder (holds ``last.pt``, and ``stage2/`` for a cascade).
        device: "auto", "cuda", "mps" or "cpu" (:func:`pick_device`).
        checkpoint: "last" or "best"; None: the one the run scored (its ``EVAL_CHECKPOINT``).
    """
    out, dev = Path(output_dir), pick_device(device)
    model, ck = _network_from(out / "last.pt", dev)
    s = (ck.get("extra") or {}).get("settings")
    if not s:
        raise ValueError(f"{out / 'last.pt'} holds no notebook settings: load_run needs a run of the notebook")
    s = _with_scoring_settings(s, out / "metrics.json")
    name = checkpoint or s.get("EVAL_CHECKPOINT", "last")
    if name != "last":
        model, _ = _network_from(out / f"{name}.pt", dev)
    stage2 = None
    if s["CASCADE"]:
        rec = s["RECIPE_SETTINGS"]
        stage2 = Stage2(_network_from(out / "stage2" / f"{name}.pt", dev)[0], s["ROI_SIZE"],
                        core_mm=s.get("CASCADE_CORE_MM"), mirror=rec["stage2_mirror"],
                        average_liver=rec.get("average_liver", False))
    return Run(model, stage2, {**s, "HU_WINDOW": tuple(s["HU_WINDOW"])}, dev)


def _with_scoring_settings(trained: dict, metrics: Path) -> dict:
    """The settings a run trained with, and from the notebook run that last scored it (``metrics.json``, when that
    run trained the same networks) the choices made after training: ``EVAL_CHECKPOINT`` and the recipe's
    :data:`INFERENCE_ONLY` keys."""
    if not metrics.exists():
        return trained
    scored = json.loads(metrics.read_text()).get("config", {})
    if any(scored.get(k) != trained.get(k) for k in RUN_KEYS if k != "RECIPE_SETTINGS"):
        return trained  # metrics.json of another run in this folder: the checkpoint's own settings
    rec = {**trained["RECIPE_SETTINGS"], **{k: v for k, v in (scored.get("RECIPE_SETTINGS") or {}).items()
                                            if k in INFERENCE_ONLY}}
    return {**trained, "EVAL_CHECKPOINT": scored.get("EVAL_CHECKPOINT", "last"), "RECIPE_SETTINGS": rec}


LABEL_COLOURS = ((0, "background", (0, 0, 0)), (1, "liver", (0, 200, 0)), (2, "tumour", (230, 0, 0)))  # as the figures


def write_colour_tables(folder: str | os.PathLike) -> list[Path]:
    """Colour tables for the label files in ``folder``: ``labels.ctbl`` (3D Slicer: load it, then pick it as the
    segmentation's colour table) and ``labels_itksnap.txt`` (ITK-SNAP: Segmentation > Import Label Descriptions)."""
    folder = Path(folder)
    slicer = "".join(f"{i} {name} {r} {g} {b} {255 if i else 0}\n" for i, name, (r, g, b) in LABEL_COLOURS)
    snap = "".join(f'{i} {r} {g} {b} {1 if i else 0} {1 if i else 0} {1 if i else 0} "{name}"\n'
                   for i, name, (r, g, b) in LABEL_COLOURS)
    paths = [folder / "labels.ctbl", folder / "labels_itksnap.txt"]
    for path, text in zip(paths, (slicer, snap)):
        _atomic_write_text(path, text)
    return paths


def predict_files(run_folder: str | os.PathLike, cts: Sequence[str | os.PathLike], out: str | os.PathLike,
                  device: str = "auto", progress: bool = True) -> list[Path]:
    """Segment CT files with a trained run: one ``NAME_pred.nii.gz`` per input in ``out`` (never beside the
    inputs), and the colour tables (:func:`write_colour_tables`).

    Raises:
        ValueError: ``out`` is the folder of an input (data folders may be read-only, and are never written),
            or an input is not a NIfTI file.
        CTDataError: an input is not a readable CT volume (the message names it).
    """
    cts, out = [Path(c) for c in cts], Path(out)
    missing = [str(c) for c in cts if not c.is_file()]
    if missing:
        raise FileNotFoundError(f"no such CT file: {', '.join(missing)}")
    names = [f"{ct.name[:-7] if ct.name.endswith('.nii.gz') else ct.stem}_pred.nii.gz" for ct in cts]  # liver_7_pred
    if len(set(names)) < len(names):
        raise ValueError("two inputs share a file name (their predictions would overwrite each other): "
                         "predict them into different --out folders")
    for ct in cts:
        if not ct.name.endswith((".nii", ".nii.gz")):
            raise ValueError(f"{ct}: not a NIfTI file (.nii or .nii.gz); convert DICOM series first (e.g. dcm2niix)")
        if ct.parent.resolve() == out.resolve():
            raise ValueError(f"--out {out} is the folder of {ct.name}: choose another, nothing is written beside "
                             "the CT files")
    run = load_run(run_folder, device)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / name for name in names]
    for ct, path in tqdm(list(zip(cts, written)), desc="predict", unit="CT", disable=not progress):
        run.predict(ct, path)
    write_colour_tables(out)
    return written


def gather_folds(paths: Sequence[str | os.PathLike]) -> dict:
    """Cross-validation results pooled as nnU-Net pools them, with the spread over folds beside them.

    Args:
        paths: the folds' ``metrics.json`` files or the folders holding them.

    Returns:
        ``{"pooled": summary, "by_fold": {key: {"mean", "std", "n"}}}``: ``pooled`` is :func:`summarize` of every
        fold's per-case rows together (per-case means over all cases, global Dice from the summed counts, lesion
        rates from the summed lesion counts; recall by lesion volume is left out, ``metrics.json`` keeps no
        lesion list); ``by_fold`` is mean ± std (ddof 1; NaN for one fold) over the folds' own summaries, null
        values skipped (``n`` then counts fewer folds).

    Raises:
        ValueError: when the folds were run with different settings (other than ``FOLD``) or scored different
            checkpoints (their numbers would not belong in one table), or a file holds no per-case counts.
    """
    values: dict[str, list[float]] = {}
    rows: list[dict] = []
    first: tuple[Path, dict] | None = None
    for p in paths:
        p = Path(p) / "metrics.json" if Path(p).is_dir() else Path(p)
        body = json.loads(p.read_text())
        setup = {**{k: v for k, v in body.get("config", {}).items() if k != "FOLD"},
                 "evaluated_checkpoint": body.get("evaluated_checkpoint")}
        first = first or (p, setup)
        differ = sorted(k for k in set(setup) | set(first[1]) if setup.get(k) != first[1].get(k))
        if differ:
            raise ValueError(f"{p} and {first[0]} were run with different settings ({', '.join(differ)}); "
                             "gather folds of one configuration, or move the others away")
        if not all("tp_tumor" in r for r in body.get("per_case", [])) or not body.get("per_case"):
            raise ValueError(f"{p} holds no per-case overlap counts (written by an older version): run its "
                             "'Evaluate' cell again to rewrite it")
        rows += body["per_case"]
        for k, v in body["summary"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
                values.setdefault(k, []).append(float(v))
    by_fold = {k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"),
                   "n": len(v)} for k, v in values.items()}
    return {"pooled": summarize(rows), "by_fold": by_fold}


def format_table(rows: Sequence[dict], columns: Sequence[str], fmt: str = ".3f", left: Sequence[str] = ()) -> str:
    """Plain-text table of ``rows`` (NaN shown as '-') for short notebook output; the ``left`` columns are
    left-aligned, the others right-aligned."""
    def cell(v):
        if isinstance(v, float):
            return "-" if math.isnan(v) else format(v, fmt)
        return str(v)
    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]

    def line(values):
        return "  ".join(v.ljust(w) if c in left else v.rjust(w) for v, w, c in zip(values, widths, columns)).rstrip()
    return "\n".join([line(columns)] + [line(b) for b in body])


RESULT_ROWS = (  # (metric, summary key, convention, which to report); the evaluation cell's table
    ("liver Dice per case", "dice_liver_lits", "label >= 1 vs >= 1 (LiTS, nnU-Net liver)", "report"),
    ("liver tissue Dice per case", "dice_liver", "label 1 alone", ""),
    ("tumour Dice per case (LiTS)", "dice_tumor_lits", "every case; tumour-free = 1 if none predicted, else 0",
     "report"),
    ("tumour Dice global", "dice_tumor_global", "LiTS 'Dice global': all cases' voxels pooled", "report"),
    ("tumour Dice, cases with tumour", "dice_tumor", "per case, over the cases with tumour only", ""),
    ("tumour Dice per case (nnU-Net)", "dice_tumor_all_cases", "nnU-Net convention: tumour-free cases without "
     "predicted tumour left out", ""),
    ("lesion recall / precision", ("lesion_recall", "lesion_precision"), "LiTS detection: IoU > 0.5 after "
     "merges and splits", ""),
    ("tumour volume predicted / true", "median_tumor_volume_ratio", "median over cases with tumour", ""),
    ("false tumour, tumour-free cases", "fp_tumor_ml_tumor_free_cases", "mL per case, mean", ""),
    ("liver HD95 (mm)", "hd95_liver_lits_mm", "MONAI; label >= 1", ""),
)


def _result_value(s: dict, key: str | tuple) -> str:
    """A summary value with its 95 % bootstrap interval, '0.912 [0.880, 0.935]' ('-' where absent or undefined)."""
    if isinstance(key, tuple):
        return " / ".join(f"{s[k]:.2f}" if s.get(k) is not None else "-" for k in key)
    if s.get(key) is None or (isinstance(s[key], float) and math.isnan(s[key])):
        return "-"
    fmt = ".1f" if key.endswith("_mm") else ".3f"
    lo, hi = s.get("ci95", {}).get(key, (float("nan"), float("nan")))
    return f"{s[key]:{fmt}}" + ("" if lo is None or math.isnan(lo) else f" [{lo:{fmt}}, {hi:{fmt}}]")


def describe_results(summary: dict, synthetic: bool, checkpoint: str = "last") -> str:
    """The evaluation summary as one table: metric, value [95 % bootstrap CI over cases], convention, and which
    numbers to report (notebook: "Evaluate")."""
    s = summary
    src = "SYNTHETIC CT (not real patients)" if synthetic else "the validation CT volumes"
    which = ("the final model ('last' checkpoint)" if checkpoint == "last" else
             f"the {checkpoint!r} checkpoint, chosen on these same cases (optimistic)")
    rows = [{"metric": m, "value [95 % CI]": _result_value(s, k), "convention": c, "report": r}
            for m, k, c, r in RESULT_ROWS if all(kk in s for kk in (k if isinstance(k, tuple) else (k,)))]
    notes = [f"post-processing: liver Dice {s['dice_liver_raw']:.3f} -> {s['dice_liver']:.3f}, tumour "
             f"{s['dice_tumor_raw']:.3f} -> {s['dice_tumor']:.3f}; undefined HD95 (empty prediction): "
             f"{s['n_hd95_liver_lits_mm_undefined']} case(s).",
             "For a paper, report the rows marked 'report' with their intervals. For scale, on real CT: the plain "
             "2D U-Net this project replaces reported liver 0.92 / tumour 0.12 per case; nnU-Net about 0.96 liver "
             "and 0.56-0.74 tumour per case on LiTS, in the conventions of the rows marked 'report'."
             + (" Synthetic numbers are not comparable to those." if synthetic else "")]
    return "\n".join([f"{s['n_cases']} validation cases ({s['n_cases_with_tumor']} with tumour) of {src}, {which}:",
                      format_table(rows, ["metric", "value [95 % CI]", "convention", "report"],
                                   left=("metric", "convention", "report")), *notes])


def write_metrics(output_dir: str | os.PathLike, config: dict, env: dict, timing: dict, per_case: list[dict],
                  summary: dict, **extra: Any) -> Path:
    """Write ``metrics.json`` (config, env, timing, per_case, summary; NaN becomes null) and ``per_case.csv`` (one
    row per validation case, for a spreadsheet), both atomically."""
    path = Path(output_dir) / "metrics.json"
    body = {"config": config, "env": env, "timing": timing, "per_case": per_case, "summary": summary, **extra}
    _atomic_write_text(path, json.dumps(json_safe(body), indent=1))
    _write_csv(Path(output_dir) / "per_case.csv", json_safe(per_case))
    return path


def _write_csv(path: Path, rows: list[dict]) -> None:
    """Rows of plain values as CSV (the union of their keys, in first-seen order; empty where a row lacks one)."""
    import csv
    import io
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if r.get(k) is None else r[k]) for k in columns} for r in rows)
    _atomic_write_text(path, buf.getvalue())


def json_safe(value: Any) -> Any:
    """Plain JSON data: NaN -> None, NumPy scalars -> Python, Paths -> str (recursively)."""
    if isinstance(value, dict):
        return {k: json_safe(x) for k, x in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(x) for x in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


# =============================================================================================
# 8. Plots                                                  (notebook: "Curves", "Look at predictions")
# =============================================================================================

def show_slice(slice_xy: np.ndarray) -> np.ndarray:
    """Turn an RAS+ axial slice ``vol[:, :, z]`` (or an (X, Y, channels) image of it) into radiological view
    (patient right on the left)."""
    return np.swapaxes(slice_xy, 0, 1)[::-1, ::-1]


def _finish(fig, title: str | None, output_dir: str | os.PathLike | None = None, name: str = "", rect=None):
    """The figure's title (None: none), tight layout within ``rect``, and the PNG ``name`` in ``output_dir`` when
    given; returns ``fig``."""
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout(rect=rect)
    if output_dir is not None:
        fig.savefig(Path(output_dir) / name, dpi=110, bbox_inches="tight")
    return fig


def show_volume(case: Case, hu_window: Sequence[float] = DEFAULT_HU_WINDOW, title: str = ""):
    """Header facts, HU histogram with the window, axial and coronal views with the label (notebook: "Look")."""
    import matplotlib.pyplot as plt
    img, lab = case.image, case.label
    print(f"case {case.case_id}: shape {case.image.shape} (X, Y, Z), spacing "
          f"{tuple(round(s, 2) for s in case.spacing)} mm, file orientation "
          f"{''.join(nib.aff2axcodes(case.source_affine))} -> shown as RAS, HU range "
          f"[{img.min():.0f}, {img.max():.0f}]")
    if lab is not None:
        vox_ml = float(np.prod(case.spacing)) / 1000
        print(f"labels: liver {(lab == 1).sum() * vox_ml:.0f} mL, tumour {(lab == 2).sum() * vox_ml:.1f} mL, "
              f"liver in {(lab >= 1).any((0, 1)).sum()} of {lab.shape[2]} slices")
    z = int((lab >= 1).sum((0, 1)).argmax()) if lab is not None else img.shape[2] // 2
    y = int((lab >= 1).sum((0, 2)).argmax()) if lab is not None else img.shape[1] // 2
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [1.2, 1, 1]})
    axes[0].hist(img[::2, ::2, :].ravel(), bins=200, range=(-1100, 1200), color="0.3")
    axes[0].axvspan(*hu_window, color="tab:orange", alpha=0.25, label=f"window {tuple(hu_window)}")
    if lab is not None:
        axes[0].hist(img[lab >= 1].ravel(), bins=100, range=(-1100, 1200), color="tab:green", label="liver")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("HU")
    axes[0].legend()
    axes[0].set_title("intensity histogram")
    w = window_hu(img[:, :, z], hu_window)
    axes[1].imshow(show_slice(w), cmap="gray")
    cor = window_hu(img[:, y, :], hu_window)
    aspect = case.spacing[2] / case.spacing[0]
    axes[2].imshow(cor.T[::-1, ::-1], cmap="gray", aspect=aspect)
    if lab is not None:
        for ax, sl, tr in ((axes[1], lab[:, :, z], show_slice), (axes[2], lab[:, y, :], lambda a: a.T[::-1, ::-1])):
            ax.contour(tr(sl >= 1), levels=[0.5], colors="lime", linewidths=1)
            if (sl == 2).any():
                ax.contour(tr(sl == 2), levels=[0.5], colors="red", linewidths=1)
    axes[1].set_title(f"axial z={z} (patient right on the left)")
    axes[2].set_title(f"coronal y={y}")
    for ax in axes[1:]:
        ax.axis("off")
    return _finish(fig, title)


def show_batch(x: torch.Tensor, y: torch.Tensor, n: int = 8, title: str = ""):
    """The centre channel of ``n`` slices of a batch with label contours (check the augmentation)."""
    import matplotlib.pyplot as plt
    n = min(n, len(x))
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.5))
    for i, ax in enumerate(np.atleast_1d(axes)):
        img, lab = x[i, x.shape[1] // 2].float().cpu().numpy(), y[i].cpu().numpy()
        ax.imshow(show_slice(img), cmap="gray", vmin=0, vmax=1)
        if (lab >= 1).any():
            ax.contour(show_slice(lab >= 1), levels=[0.5], colors="lime", linewidths=0.8)
        if (lab == 2).any():
            ax.contour(show_slice(lab == 2), levels=[0.5], colors="red", linewidths=0.8)
        ax.axis("off")
    return _finish(fig, title or f"{n} training slices after augmentation (centre of {x.shape[1]} channels)")


def plot_history(history: list[dict], output_dir: str | os.PathLike | None = None, title: str = "",
                 stage2_history: list[dict] | None = None, scored: Sequence[int] = ()):
    """Training curves: cross-entropy and Dice loss (training solid, validation dashed) and the per-epoch 2D
    validation Dice, per epoch.

    Args:
        history, stage2_history: :func:`train`'s histories; stage 2's epochs follow stage 1's on the same axis,
            after a dotted line. With a stage 2, stage 1's tumour Dice is left out: stage 1 only finds the liver.
        scored: epochs, counted over both stages from 1, whose checkpoints are evaluated (marked).
    """
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    stages = [(history, 0, bool(stage2_history))]
    if stage2_history:
        stages.append((stage2_history, len(history), False))
    curves = [(0, "train_ce", "-", "tab:blue", "training"), (0, "val_ce", "--", "tab:blue", "validation"),
              (1, "train_dice_loss", "-", "tab:orange", "training"),
              (1, "val_dice_loss", "--", "tab:orange", "validation"),
              (2, "val_dice_liver_2d", "-", "tab:green", "liver"), (2, "val_dice_tumor_2d", "-", "tab:red", "tumour"),
              (2, "val_dice_mean_2d", "-", "k", "mean")]
    labelled = set()
    for hist, offset, liver_only in stages:
        ep = [offset + h["epoch"] for h in hist]
        for panel, key, style, colour, name in curves:
            if key in hist[0] and not (liver_only and key in ("val_dice_tumor_2d", "val_dice_mean_2d")):
                axes[panel].plot(ep, [h[key] for h in hist], style, color=colour,
                                 label=None if key in labelled else name)
                labelled.add(key)
    for ax, name in zip(axes, ("cross-entropy", "Dice loss", "validation Dice (2D, pooled slices)")):
        if stage2_history:
            ax.axvline(len(history) + 0.5, color="grey", ls=":", lw=1)
            ax.text(len(history) + 0.6, 0.98, "stage 2 (liver boxes)", transform=ax.get_xaxis_transform(),
                    fontsize=8, va="top", color="grey")
        for e in scored:
            ax.axvline(e, color="purple", lw=1, alpha=0.6)
        ax.set(title=name, xlabel="epoch" + (" (stage 1, then stage 2)" if stage2_history else ""))
        ax.grid(alpha=0.3)
    if scored:
        axes[2].plot([], [], color="purple", alpha=0.6, label="scored checkpoint" + ("s" if len(scored) > 1 else ""))
    for ax in axes:
        ax.legend(fontsize=8)
    axes[2].set_ylim(0, 1)
    return _finish(fig, title, output_dir, "training_curves.png")


def plot_per_case(per_case: list[dict], output_dir: str | os.PathLike | None = None, title: str = ""):
    """Per-case 3D Dice, liver (label ≥ 1, LiTS) and tumour, sorted by tumour Dice, each value printed; the
    tumour-free cases last, with the tumour they were wrongly given (mL)."""
    import matplotlib.pyplot as plt
    rows = sorted(per_case, key=lambda r: (not r["has_tumor"], r["dice_tumor"] if r["has_tumor"] else 0))
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4))
    liver = [r["dice_liver_lits"] for r in rows]
    tumor = [r["dice_tumor"] if r["has_tumor"] else 0.0 for r in rows]
    ax.bar(x - 0.2, liver, 0.4, color="tab:green", label="liver (label ≥ 1)")
    ax.bar(x + 0.2, tumor, 0.4, color="tab:red", label="tumour")
    for i, r in enumerate(rows):
        ax.text(i - 0.2, liver[i] + 0.01, f"{liver[i]:.2f}", ha="center", fontsize=7, rotation=90, va="bottom")
        ax.text(i + 0.2, tumor[i] + 0.01, f"{tumor[i]:.2f}" if r["has_tumor"] else
                f"no tumour; {r['fp_tumor_ml']:.1f} mL called", ha="center", fontsize=7, rotation=90, va="bottom")
    ax.set_xticks(x, [r["case"] for r in rows], rotation=60, fontsize=8)
    ax.set(ylim=(0, 1.25), ylabel="3D Dice", title=title or "per-case 3D Dice (validation), by tumour Dice")
    ax.legend(loc="upper left", fontsize=8, ncols=2)
    ax.grid(axis="y", alpha=0.3)
    return _finish(fig, None, output_dir, "per_case_dice.png")


OVERLAY_COLOURS = {"tumour found": (1.0, 0.85, 0.0), "tumour missed": (0.0, 0.8, 1.0),
                   "false tumour": (1.0, 0.0, 1.0)}  # true positive, false negative, false positive


def _overlay(ax, case: CachedCase, z: int, truth: np.ndarray, pred: np.ndarray, box: tuple[int, int, int, int]) -> None:
    """Axial slice ``z`` of ``case`` (its network slice resized to the label grid) in radiological view, cropped to
    ``box`` (x0, x1, y0, y1): the liver's outline, true (solid) and predicted (dashed), and the tumour's true
    positives, misses and false positives in colour."""
    x0, x1, y0, y1 = box
    ct = _resize2d(np.asarray(case.image[z], np.float32), truth.shape)[x0:x1, y0:y1]
    truth, pred = truth[x0:x1, y0:y1], pred[x0:x1, y0:y1]
    ax.imshow(show_slice(ct), cmap="gray", vmin=0, vmax=1)
    rgba = np.zeros((*truth.shape, 4))
    for (_name, colour), mask in zip(OVERLAY_COLOURS.items(), ((truth == 2) & (pred == 2), (truth == 2) & (pred != 2),
                                                               (truth != 2) & (pred == 2))):
        rgba[mask] = (*colour, 0.55)
    ax.imshow(show_slice(rgba))
    for lab, style in ((truth, "solid"), (pred, "dashed")):
        if (lab >= 1).any():
            ax.contour(show_slice(lab >= 1), levels=[0.5], colors="lime", linewidths=1, linestyles=style)
    ax.axis("off")


def _liver_crop(truth: np.ndarray, pred: np.ndarray, margin: int = 12) -> tuple[int, int, int, int]:
    """The in-plane box (x0, x1, y0, y1) around the liver and tumour of (X, Y[, Z]) labels, true or predicted (so
    that no false call is cut off), plus ``margin``; the whole slice where neither has any."""
    fg = np.zeros(truth.shape[:2], bool)
    for lab in (truth, pred):
        fg |= (lab >= 1).any(axis=2) if lab.ndim == 3 else lab >= 1
    if not fg.any():
        return 0, fg.shape[0], 0, fg.shape[1]
    xs, ys = np.flatnonzero(fg.any(1)), np.flatnonzero(fg.any(0))
    return (max(0, xs[0] - margin), min(fg.shape[0], xs[-1] + 1 + margin),
            max(0, ys[0] - margin), min(fg.shape[1], ys[-1] + 1 + margin))


def _overlay_legend(fig) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    handles = [Patch(color=c, label=n) for n, c in OVERLAY_COLOURS.items()]
    handles += [Line2D([], [], color="lime", label="liver, truth"), Line2D([], [], color="lime", ls="--",
                                                                            label="liver, prediction")]
    fig.legend(handles=handles, loc="lower center", ncols=5, fontsize=8, frameon=False)


def _slices_by_tumor(labels: np.ndarray) -> np.ndarray:
    """The slice indices z of (X, Y, Z) labels, the most tumour voxels first, ties by the most liver voxels."""
    return np.lexsort(((labels >= 1).sum((0, 1)), (labels == 2).sum((0, 1))))[::-1]


def plot_overlays(cases: Sequence[CachedCase], predictions: dict, per_case: list[dict],
                  output_dir: str | os.PathLike | None = None, title: str = ""):
    """The worst, median and best validation case, each at its slice with the most tumour, zoomed on the liver:
    truth and prediction in one panel (:func:`_overlay`), the case's 3D Dice in the title.

    Cases are ranked by ``dice_mean`` (mean of liver and tumour Dice), so only cases with tumour compete; without
    any, by liver Dice (label ≥ 1).
    """
    import matplotlib.pyplot as plt
    key = "dice_mean" if any(not math.isnan(r["dice_mean"]) for r in per_case) else "dice_liver_lits"
    ranked = sorted((r for r in per_case if not math.isnan(r[key])), key=lambda r: r[key])
    picks = {"worst": ranked[0], "median": ranked[len(ranked) // 2], "best": ranked[-1]}
    by_id = {c.case_id: c for c in cases}
    fig, axes = plt.subplots(1, 3, figsize=(13, 5))
    for ax, (name, r) in zip(axes, picks.items()):
        c = by_id[r["case"]]
        truth, pred = np.asarray(c.label_full), predictions[r["case"]]
        z = int(_slices_by_tumor(truth)[0])
        _overlay(ax, c, z, truth[:, :, z], pred[:, :, z], _liver_crop(truth[:, :, z], pred[:, :, z]))
        tumor = "no tumour" if math.isnan(r["dice_tumor"]) else f"tumour {r['dice_tumor']:.2f}"
        ax.set_title(f"{name}: {r['case']}, z={z}\nDice liver {r['dice_liver_lits']:.2f}, {tumor}", fontsize=9)
    _overlay_legend(fig)
    return _finish(fig, title or "validation cases: worst, median, best", output_dir, "overlays.png",
                   (0, 0.05, 1, 0.97))


def plot_montage(case: CachedCase, prediction: np.ndarray, n: int = 6, output_dir: str | os.PathLike | None = None,
                 title: str = ""):
    """Up to ``n`` slices of one case with the most tumour (liver where it has none), in slice order, zoomed on its
    liver (one box for all), truth and prediction as in :func:`plot_overlays`, each slice's tumour Dice above it."""
    import matplotlib.pyplot as plt
    truth = np.asarray(case.label_full)
    shown = (truth == 2).any((0, 1)) if (truth == 2).any() else (truth >= 1).any((0, 1))  # tumour, else liver
    zs = sorted(int(z) for z in [z for z in _slices_by_tumor(truth) if shown[z]][:n]) or [truth.shape[2] // 2]
    box = _liver_crop(truth[:, :, zs], prediction[:, :, zs])
    cols = min(3, len(zs))
    rows = -(-len(zs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.8 * rows + 0.8), squeeze=False)
    for ax, z in zip(axes.flat, zs):
        t, p = truth[:, :, z], prediction[:, :, z]
        _overlay(ax, case, z, t, p, box)
        ax.set_title(f"z={z}: tumour Dice {dice(p == 2, t == 2):.2f}" if (t == 2).any() else f"z={z}: no tumour",
                     fontsize=9)
    for ax in list(axes.flat)[len(zs):]:
        ax.axis("off")
    _overlay_legend(fig)
    return _finish(fig, title or f"{case.case_id}: the slices with the most tumour", output_dir, "montage.png",
                   (0, 0.05, 1, 0.97))


def plot_lesions(lesions: Sequence[dict], output_dir: str | os.PathLike | None = None, title: str = ""):
    """Reference lesions by volume, detected vs missed (log scale), and the recall by volume bin and by contrast
    group (hypodense, faint, hyperdense: the sampler's groups), with the number of lesions under each bar.

    Args:
        lesions: :func:`lesion_detection` results, one per case (``evaluate(...)["lesions"]``).
    """
    import matplotlib.pyplot as plt
    flat = [les for r in lesions for les in r["lesions"]]
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(14, 3.4), gridspec_kw={"width_ratios": [2.6, 1.2, 1.2]})
    rng = np.random.default_rng(0)
    for detected, colour, name in ((True, "tab:green", "detected"), (False, "tab:red", "missed")):
        vols = [les["volume_ml"] for les in flat if les["detected"] == detected]
        ax.scatter(vols, float(detected) + rng.uniform(-0.15, 0.15, len(vols)), s=18, color=colour,
                   label=f"{name} ({len(vols)})")
    for edge in (1, 10):
        ax.axvline(edge, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yticks([0, 1], ["missed", "detected"])
    ax.set_xlabel("reference lesion volume (mL)")
    ax.legend(loc="center right", fontsize=8)
    summ = lesion_summary(lesions)
    for axis, key, names, colour in ((bx, "volume", LESION_VOLUME_BINS, "tab:blue"),
                                     (cx, "contrast", CONTRAST_GROUPS, "tab:purple")):
        recall, counts = summ[f"lesion_recall_by_{key}"], summ[f"lesion_count_by_{key}"]
        axis.bar(names, [0 if math.isnan(recall[k]) else recall[k] for k in names], color=colour)
        for i, k in enumerate(names):
            axis.text(i, 0.02, f"n={counts[k]}", ha="center", fontsize=8, color="white" if recall[k] > 0.1 else "k")
        axis.set(ylim=(0, 1), ylabel="lesion recall", title=f"by {key}")
        axis.tick_params(axis="x", labelsize=8)
    return _finish(fig, title or "lesion detection as LiTS counts it (IoU > 0.5 after merges and splits)",
                   output_dir, "lesions.png")


def plot_cascade(case: CachedCase, stage1: torch.nn.Module, stage2: Stage2, context: int,
                 device: torch.device | str = "cpu", output_dir: str | os.PathLike | None = None, title: str = ""):
    """What the cascade does on one case, at the slice of its liver box with the most tumour: (1) stage 1's labels
    on the full-resolution slice, with the box they give; (2) the box as stage 2 sees it, the truth outlined;
    (3) the full slice after stage 2's labels are pasted back (green liver, red tumour)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    truth = np.asarray(case.label_full)
    full = window_hu(load_case(case.meta["image_path"]).image, case.meta["hu_window"])
    coarse, fg = predict_slices(stage1, case.image, truth.shape[:2], context, device, foreground=True)
    box, crop = cascade_input(coarse, full, case.meta["spacing"], stage2)
    note = ""
    if box is None:  # an untrained stage 1: show stage 2 on the true liver's box instead, and say so
        coarse = (truth >= 1).astype(np.uint8)
        fg = np.full(coarse.shape, 0.5, np.float16)  # neutral: stage 2's own call decides
        box, crop = cascade_input(coarse, full, case.meta["spacing"], stage2)
        note = " (stage 1 found no liver: box from the ground truth)"
    if box is None:
        raise ValueError(f"{case.case_id} has no liver in its label: pick a case with liver to show the cascade")
    x0, x1, y0, y1, z0, z1 = box
    refined = predict_cascade(coarse, full, case.meta["spacing"], stage2, context, device, stage1_fg=fg)
    inside = truth[x0:x1, y0:y1, z0:z1]
    k = int(_slices_by_tumor(inside)[0])
    z = z0 + k
    crop_k = np.asarray(crop[k], np.float32)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    panels = ((full[:, :, z], coarse[:, :, z], f"1. stage 1 ({case.image.shape[1]}² input), z={z}:\n"
               "its labels and the liver box"),
              (_resize2d(crop_k, (x1 - x0, y1 - y0)), truth[x0:x1, y0:y1, z],
               f"2. stage 2's input: the {x1 - x0}×{y1 - y0} box at native pixels"
               + ("" if x1 - x0 <= stage2.roi_size else f"\n(resized to {stage2.roi_size}²)") + ", truth outlined"),
              (full[:, :, z], refined[:, :, z], "3. the cascade's labels in the box\npasted back into the full slice"))
    for ax, (img, lab, name) in zip(axes, panels):
        ax.imshow(show_slice(img), cmap="gray", vmin=0, vmax=1)
        ax.contour(show_slice(lab >= 1), levels=[0.5], colors="lime", linewidths=1)
        if (lab == 2).any():
            ax.contour(show_slice(lab == 2), levels=[0.5], colors="red", linewidths=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    nx, ny = full.shape[:2]  # show_slice puts voxel (x, y) at column nx-1-x, row ny-1-y
    for ax in (axes[0], axes[2]):
        ax.add_patch(Rectangle((nx - x1 - 0.5, ny - y1 - 0.5), x1 - x0, y1 - y0, fill=False, color="yellow", lw=1.5))
    return _finish(fig, (title or f"cascade on {case.case_id} (green liver, red tumour)") + note, output_dir,
                   "cascade.png", (0, 0, 1, 0.95))


def _resize2d(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of one 2D image (for display)."""
    t = torch.from_numpy(np.ascontiguousarray(img))[None, None]
    return F.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()


# =============================================================================================
# 9. Synthetic CT set                                           (notebook: "Data", no real CT found)
# =============================================================================================

class _Grid:
    """World coordinates (mm, RAS+) of a volume's voxel centres, as broadcastable 1D axes."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
        self.shape, self.spacing = shape, spacing
        self.axes = [(np.arange(n) - (n - 1) / 2) * s if i < 2 else np.arange(n) * s
                     for i, (n, s) in enumerate(zip(shape, spacing))]

    def box(self, center: Sequence[float], half: Sequence[float]) -> tuple[tuple[slice, ...], list]:
        """Index slices and (x, y, z) coordinate arrays of the box ``center +- half`` (mm)."""
        sl, co = [], []
        for ax, c, h, s in zip(self.axes, center, half, self.spacing):
            lo = int(np.clip(np.searchsorted(ax, c - h - s), 0, len(ax)))
            hi = int(np.clip(np.searchsorted(ax, c + h + s), 0, len(ax)))
            sl.append(slice(lo, hi))
            co.append(ax[lo:hi])
        x, y, z = co
        return tuple(sl), [x[:, None, None], y[None, :, None], z[None, None, :]]


def _ellipsoid(coords: list, center: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) on box coordinates."""
    return np.sqrt(sum(((c - m) / r) ** 2 for c, m, r in zip(coords, center, radii)))


def _wobble(rng: np.random.Generator, coords: list, amp: float, wavelength: tuple[float, float], n: int = 5):
    """Smooth random field (sum of plane waves) to make shapes irregular."""
    x, y, z = coords
    out = 0.0
    for _ in range(n):
        d = rng.normal(size=3)
        d *= 2 * np.pi / (rng.uniform(*wavelength) * np.linalg.norm(d))
        out = out + rng.uniform(0.3, 1.0) * np.sin(d[0] * x + d[1] * y + d[2] * z + rng.uniform(0, 2 * np.pi))
    return amp * out / n * 2


def _fill(sc, sl, mask, hu, label=None, within=None) -> None:
    """Set ``hu`` (and ``label``) where ``mask`` (in the box ``sl``) holds, and ``within`` where given."""
    if within is not None:
        mask = mask & within[sl]
    sc.vol[sl][mask] = hu
    if label is not None:
        sc.lab[sl][mask] = label


def _paint_ellipsoid(sc, center, radii, hu, label=None, wobble=0.0, within=None) -> None:
    """Paint a (wobbly) ellipsoid into the scene (:func:`_fill`)."""
    sl, co = sc.grid.box(center, np.asarray(radii) * (1 + wobble * 1.5))
    f = _ellipsoid(co, center, radii)
    if wobble:
        f = f + _wobble(sc.rng, co, wobble, (40, 120))
    _fill(sc, sl, f < 1, hu, label, within)


def _paint_tube(sc, p0, p1, radius, hu, label=None, within=None) -> None:
    """Paint a cylinder of ``radius`` around segment p0-p1 (mm) into the scene (:func:`_fill`)."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    sl, (x, y, z) = sc.grid.box((p0 + p1) / 2, np.abs(p1 - p0) / 2 + radius)
    d = p1 - p0
    t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / max(d @ d, 1e-6), 0, 1)
    dist2 = (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2
    _fill(sc, sl, dist2 < radius ** 2, hu, label, within)


SYNTHETIC_HU: dict[str, tuple[float, float]] = {  # tissue: HU range, one value drawn per case (portal-venous CT)
    "subcutaneous fat": (-110, -90), "abdominal wall muscle": (40, 60), "visceral fat": (-100, -70),
    "bowel wall": (15, 45), "bowel gas": (-900, -600), "psoas": (45, 60), "lung": (-870, -820),
    "vertebral cortex": (700, 950), "vertebral body": (200, 300), "posterior arch": (400, 700),
    "spinal canal": (0, 20), "rib": (450, 900), "liver": (100, 130), "aorta": (140, 190), "IVC": (110, 140),
    "kidney": (150, 200), "renal pelvis": (10, 30), "spleen minus liver": (-10, 15), "stomach wall": (60, 90),
    "stomach content": (0, 20), "hepatic vessels minus liver": (30, 60), "gallbladder": (5, 25),
}
LESION_DELTA_HU = {"hypo": (15, 60), "hyper": (15, 40), "faint": (6, 15)}  # |lesion - liver| HU by kind


@dataclass
class _Scene:
    """A synthetic CT being painted, and the anatomy that later parts place themselves by (mm, RAS+)."""

    rng: np.random.Generator
    grid: _Grid
    length: float
    vol: np.ndarray
    lab: np.ndarray
    geo: dict  # body and liver geometry, filled in order by the painting steps

    def hu(self, tissue: str) -> float:
        """One HU value for ``tissue`` from :data:`SYNTHETIC_HU`."""
        return self.rng.uniform(*SYNTHETIC_HU[tissue])


def _paint_body(sc: _Scene) -> None:
    """Fat shell, muscle wall and visceral fat; the outline changes slowly along z."""
    rng, g = sc.rng, sc.geo
    X, Y, Z = (sc.grid.axes[0][:, None, None], sc.grid.axes[1][None, :, None], sc.grid.axes[2][None, None, :])
    ax, ay = rng.uniform(140, 175), rng.uniform(100, 125)
    zmod = 1 + 0.04 * np.sin(Z / 60.0 + rng.uniform(0, 6))
    fat_t, wall_t = rng.uniform(10, 30), rng.uniform(8, 14)
    r_body = np.sqrt((X / (ax * zmod)) ** 2 + (Y / (ay * zmod)) ** 2)
    sc.vol[r_body < 1] = sc.hu("subcutaneous fat")
    scale_in = 1 - fat_t / ay
    sc.vol[r_body < scale_in] = sc.hu("abdominal wall muscle")
    cavity = r_body < scale_in - wall_t / ay
    sc.vol[cavity] = sc.hu("visceral fat")
    g.update(X=X, Y=Y, Z=Z, ax=ax, ay=ay, scale_in=scale_in, cavity=cavity)


def _place_liver(sc: _Scene) -> None:
    """The liver's geometry (everything else is placed around it); it spans ~35-45 % of the slices."""
    rng, g = sc.rng, sc.geo
    rz = rng.uniform(0.36, 0.46) * sc.length / 2
    cz = rng.uniform(0.52, 0.58) * sc.length
    liver_c = np.array([g["ax"] * rng.uniform(0.32, 0.42), rng.uniform(-5, 15), cz])
    liver_r = np.array([rng.uniform(60, 78), rng.uniform(65, 85), rz])
    lobe_c = np.array([rng.uniform(-30, -5), liver_c[1] + rng.uniform(25, 40), cz + rz * rng.uniform(0.1, 0.3)])
    lobe_r = np.array([rng.uniform(45, 65), rng.uniform(25, 35), rz * rng.uniform(0.4, 0.55)])
    g.update(rz=rz, cz=cz, top=cz + rz, liver_c=liver_c, liver_r=liver_r, lobe_c=lobe_c, lobe_r=lobe_r)


def _paint_bowel_and_psoas(sc: _Scene) -> None:
    """Bowel loops, some with gas, in the lower abdomen; the psoas muscles."""
    rng, g = sc.rng, sc.geo
    ax, ay, cz, rz, cavity = g["ax"], g["ay"], g["cz"], g["rz"], g["cavity"]
    for _ in range(int(rng.integers(10, 18))):
        c = [rng.uniform(-0.6, 0.6) * ax, rng.uniform(-0.3, 0.6) * ay, rng.uniform(0, cz - 0.5 * rz)]
        r = rng.uniform(12, 28, size=3)
        _paint_ellipsoid(sc, c, r, sc.hu("bowel wall"), wobble=0.15, within=cavity)
        if rng.random() < 0.5:
            _paint_ellipsoid(sc, [c[0], c[1] + r[1] * 0.4, c[2]], r * 0.45, sc.hu("bowel gas"), within=cavity)
    for sx in (-1, 1):
        _paint_tube(sc, (sx * 45, -ay * 0.55, 0), (sx * 30, -ay * 0.55, cz - 0.6 * rz), 18, sc.hu("psoas"),
                    within=cavity)


def _paint_lungs_spine_ribs(sc: _Scene) -> None:
    """Lungs above the liver dome; the spine (body, posterior arch, canal); ribs around the liver."""
    rng, g, L = sc.rng, sc.geo, sc.length
    ax, ay = g["ax"], g["ay"]
    for sx in (-1, 1):
        c = [sx * ax * 0.5, -10, g["top"] + 0.95 * L * 0.5]
        _paint_ellipsoid(sc, c, [ax * 0.42, ay * 0.7, L * 0.5], sc.hu("lung"), wobble=0.05, within=g["cavity"])
    spine = g["sc"] = -ay * 0.62
    for dy, radius, tissue in ((0, 22, "vertebral cortex"), (0, 18, "vertebral body"), (-38, 14, "posterior arch"),
                               (-30, 7, "spinal canal")):
        _paint_tube(sc, (0, spine + dy, -10), (0, spine + dy, L + 10), radius, sc.hu(tissue))
    X, Y, Z = g["X"], g["Y"], g["Z"]
    rib_zone = Z > g["cz"] - 0.6 * g["rz"]
    rib_hu = sc.hu("rib")
    for k, ang in enumerate(np.linspace(0.15 * np.pi, 0.85 * np.pi, 9)):
        for sx in (-1, 1):
            rx = sx * np.cos(ang) * ax * (g["scale_in"] - 0.04)
            ry = np.sin(ang - 0.5) * ay * (g["scale_in"] - 0.04)
            band = np.sin(2 * np.pi * Z / rng.uniform(28, 36) + k) > 0.2
            sc.vol[(((X - rx) ** 2 + (Y - ry) ** 2) < 5.5 ** 2) & band & rib_zone] = rib_hu


def _paint_neighbours(sc: _Scene) -> None:
    """Aorta, kidneys, spleen and stomach: the liver's neighbours, several with liver-like HU."""
    rng, g = sc.rng, sc.geo
    ax, ay, cz, rz, spine, cavity = g["ax"], g["ay"], g["cz"], g["rz"], g["sc"], g["cavity"]
    g["liver_hu"] = sc.hu("liver")
    _paint_tube(sc, (-15, spine + 35, -10), (-15, spine + 35, sc.length + 10), rng.uniform(10, 13), sc.hu("aorta"))
    g["ivc_hu"] = sc.hu("IVC")
    for sx, dz in ((1, -0.75), (-1, -0.55)):
        c = [sx * ax * 0.42, spine + 15, cz + dz * rz]
        _paint_ellipsoid(sc, c, [26, 30, 50], sc.hu("kidney"), wobble=0.08, within=cavity)
        _paint_ellipsoid(sc, [c[0] - sx * 8, c[1], c[2]], [9, 12, 25], sc.hu("renal pelvis"))
    spleen_hu = g["liver_hu"] + sc.hu("spleen minus liver")
    _paint_ellipsoid(sc, [-ax * 0.52, -ay * 0.25, cz + 0.1 * rz], [32, 50, 0.5 * rz], spleen_hu, wobble=0.12,
                     within=cavity)
    st_c, st_r = [-ax * 0.28, ay * 0.15, cz + 0.25 * rz], np.array([42, 34, 0.5 * rz])
    _paint_ellipsoid(sc, st_c, st_r, sc.hu("stomach wall"), wobble=0.1, within=cavity)
    _paint_ellipsoid(sc, st_c, st_r - 5, sc.hu("stomach content"), wobble=0.1, within=cavity)
    _paint_ellipsoid(sc, [st_c[0], st_c[1] + 20, st_c[2]], [25, 12, 25], -850, within=cavity)


def _paint_liver(sc: _Scene) -> np.ndarray:
    """The liver (label 1): a smooth union of two lobes, irregular surface, texture, vessels; the IVC through
    its back and the gallbladder under it are not liver.  Returns the liver mask."""
    rng, g, grid = sc.rng, sc.geo, sc.grid
    liver_c, liver_r, lobe_c, lobe_r, rz = g["liver_c"], g["liver_r"], g["lobe_c"], g["lobe_r"], g["rz"]
    sl, co = grid.box(np.minimum(liver_c, lobe_c) / 2 + np.maximum(liver_c, lobe_c) / 2,
                      np.abs(liver_c - lobe_c) / 2 + np.maximum(liver_r, lobe_r) * 1.3)
    e1, e2 = _ellipsoid(co, liver_c, liver_r), _ellipsoid(co, lobe_c, lobe_r)
    k = 0.15  # softness of the union of the two lobes
    f = -k * np.logaddexp(-e1 / k, -e2 / k) + _wobble(rng, co, 0.12, (50, 140))
    liver = np.zeros(grid.shape, bool)
    liver[sl] = (f < 1) & g["cavity"][sl]
    sc.vol[sl][liver[sl]] = (g["liver_hu"] + _wobble(rng, co, 4.0, (20, 60)) * np.ones_like(f))[liver[sl]]
    sc.lab[liver] = 1
    hilum = liver_c + [-0.35 * liver_r[0], 0, -0.1 * rz]
    for _ in range(int(rng.integers(4, 8))):
        tip = liver_c + rng.uniform(-0.8, 0.8, 3) * liver_r
        _paint_tube(sc, hilum, tip, rng.uniform(2.5, 6), g["liver_hu"] + sc.hu("hepatic vessels minus liver"),
                    within=liver)
    spine, cz, top = g["sc"], g["cz"], g["top"]  # the IVC runs through the liver's back; not liver
    _paint_tube(sc, (22, spine + 38, cz - rz), (22, spine + 38, top + 10), rng.uniform(10, 13), g["ivc_hu"], label=0)
    if rng.random() < 0.7:  # gallbladder under the liver: hypodense but not tumour
        _paint_ellipsoid(sc, liver_c + [-10, 30, -0.55 * rz], [14, 18, 28], sc.hu("gallbladder"), label=0,
                         within=g["cavity"])
    return sc.lab == 1


def _paint_lesions(sc: _Scene, liver: np.ndarray, size: float = 1.0, contrast: float = 1.0) -> list[dict]:
    """0-8 lesions (label 2) inside the liver: count, total burden, sizes and contrast kinds; their facts.

    Each is placed as at full size, so ``size`` and ``contrast`` scale lesions without changing any draw.
    """
    rng, grid = sc.rng, sc.grid
    n_les = 0 if rng.random() < 0.15 else int(rng.choice(np.arange(1, 9), p=np.array([8, 6, 5, 4, 3, 2, 2, 1]) / 31))
    liver_ml = liver.sum() * np.prod(grid.spacing) / 1000
    burden = np.exp(rng.uniform(np.log(0.002), np.log(0.07)))  # tumour share of the liver volume
    weights = rng.dirichlet(np.ones(max(n_les, 1)) * 0.7)
    lesions, liver_idx = [], np.argwhere(liver)
    for i in range(n_les):
        r0 = float(np.clip((3 * weights[i] * burden * liver_ml * 1000 / (4 * np.pi)) ** (1 / 3), 2.0, 25.0))
        r = r0 * size
        for _try in range(20):  # centre well inside the liver
            c = np.asarray(liver_idx[rng.integers(len(liver_idx))]) * 1.0
            c = np.array([grid.axes[a][int(c[a])] for a in range(3)])
            sl, co = grid.box(c, [r0] * 3)
            if liver[sl].mean() > 0.8:
                break
        if r > r0:
            sl, co = grid.box(c, [r] * 3)
        kind = rng.choice(["hypo", "hyper", "faint"], p=[0.7, 0.15, 0.15])
        deltas = {"hypo": -rng.uniform(*LESION_DELTA_HU["hypo"]), "hyper": rng.uniform(*LESION_DELTA_HU["hyper"]),
                  "faint": rng.choice([-1, 1]) * rng.uniform(*LESION_DELTA_HU["faint"])}  # all three drawn
        delta = deltas[kind] * contrast
        radii = r * rng.uniform(0.75, 1.25, 3)
        f = _ellipsoid(co, c, radii) + _wobble(rng, co, 0.1, (10, 30))
        m = (f < 1) & liver[sl]
        if not m.any():
            continue
        edge = np.clip((1 - f) / 0.3, 0, 1)  # soft rim: partial contrast at the boundary
        sc.vol[sl][m] = (sc.vol[sl] + delta * (0.6 + 0.4 * edge) + _wobble(rng, co, 6.0, (5, 15)))[m]
        sc.lab[sl][m] = 2
        lesions.append({"radius_mm": round(r, 1), "kind": str(kind), "delta_hu": round(float(delta), 1)})
    return lesions


def _acquire(sc: _Scene) -> tuple[np.ndarray, float]:
    """Partial-volume blur and noise; int16 HU and the noise sigma."""
    from scipy.ndimage import gaussian_filter
    vol = gaussian_filter(sc.vol, sigma=(0.7, 0.7, 0.4), truncate=3.0)
    sigma = sc.rng.uniform(10, 20)
    vol += sc.rng.standard_normal(vol.shape, dtype=np.float32) * sigma
    return np.clip(np.rint(vol), -1024, 3071).astype(np.int16), sigma


def synthetic_ct_volume(shape: tuple[int, int, int] = (256, 256, 64), seed: int = 0, lesion_size_scale: float = 1.0,
                        lesion_contrast_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """One synthetic contrast-enhanced abdominal CT in RAS+ orientation.

    Used by :func:`make_synthetic_dataset`.  The anatomy is built so that intensity alone does
    not find the liver (spleen, IVC, kidneys and stomach wall share its HU, :data:`SYNTHETIC_HU`)
    and tumours stay hard (0-8 lesions of 2-25 mm radius, mostly hypodense by 15-60 HU, some
    hyperdense or faint, 0.2-7 % of the liver), with noise, blur and partial-volume edges.

    ``lesion_size_scale`` and ``lesion_contrast_scale`` scale every lesion's radius and HU difference (e.g. 0.6
    and 0.6 for a harder set of smaller, fainter lesions); the random draws, and so the anatomy and
    the lesions' places and kinds, stay those of the unscaled case.

    Returns:
        (image int16 HU (X, Y, Z), label uint8 (X, Y, Z), affine (4x4), facts dict).
    """
    rng = np.random.default_rng(seed)
    fov, length = rng.uniform(340, 420), rng.uniform(220, 280)  # in-plane field of view, cranio-caudal extent (mm)
    grid = _Grid(shape, (fov / shape[0], fov / shape[1], length / shape[2]))
    sc = _Scene(rng, grid, length, np.full(shape, -1000.0, np.float32), np.zeros(shape, np.uint8), {})
    _paint_body(sc)
    _place_liver(sc)
    _paint_bowel_and_psoas(sc)
    _paint_lungs_spine_ribs(sc)
    _paint_neighbours(sc)
    liver = _paint_liver(sc)
    lesions = _paint_lesions(sc, liver, lesion_size_scale, lesion_contrast_scale)
    image, sigma = _acquire(sc)
    affine = np.diag([*grid.spacing, 1.0])
    affine[:3, 3] = [grid.axes[0][0], grid.axes[1][0], grid.axes[2][0]]
    facts = {"spacing": [round(v, 3) for v in grid.spacing], "noise_hu": round(float(sigma), 1),
             "liver_hu": round(float(sc.geo["liver_hu"]), 1), "lesions": lesions}
    return image, sc.lab, affine, facts


def _to_lps(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Store an RAS+ array with an LPS header (x and y flipped), same world positions."""
    nx, ny = array.shape[:2]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:3, 3] = [nx - 1, ny - 1, 0]
    return np.ascontiguousarray(array[::-1, ::-1]), affine @ flip


def _save_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI file (qform = sform = ``affine``, mm units), atomically."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    atomic_write(path, lambda tmp: nib.save(img, str(tmp)))


def _write_synthetic_case(out: Path, name: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray,
                          lps: bool) -> None:
    """``images/name.nii.gz`` and ``labels/name.nii.gz``, stored with an LPS header where ``lps`` (as LiTS)."""
    if lps:
        (image, lps_affine), (label, _) = _to_lps(image, affine), _to_lps(label, affine)
        affine = lps_affine
    _save_nifti_atomic(image, affine, out / "images" / f"{name}.nii.gz")
    _save_nifti_atomic(label, affine, out / "labels" / f"{name}.nii.gz")


def _finished_set(out: Path, settings: dict) -> dict | None:
    """The ``synthetic.json`` of ``out`` where it already holds the whole set these settings write, else None."""
    manifest = out / "synthetic.json"
    old = json.loads(manifest.read_text()) if manifest.exists() else {}
    files = [out / d / f"liver_{i}.nii.gz" for i in range(settings["n_cases"]) for d in ("images", "labels")]
    return old if old.get("settings") == settings and all(f.exists() for f in files) else None


def make_synthetic_dataset(out_dir: str | os.PathLike, n_cases: int = 24, shape: tuple[int, int, int] = (256, 256, 64),
                           seed: int = 0, lps_fraction: float = 0.3, progress: bool = True,
                           lesion_size_scale: float = 1.0, lesion_contrast_scale: float = 1.0) -> dict:
    """Write a synthetic CT set in the Kaggle layout (images/liver_N.nii.gz, labels/liver_N.nii.gz).

    Used in the notebook section "Data" when no real CT is found.  Deterministic by seed; files
    already written with the same settings are kept.  A share of the cases is stored with an
    LPS header, as in LiTS, to exercise the canonical reorientation.

    Args:
        out_dir: folder to write (it becomes a data folder: nothing else is written into it later).
        n_cases: number of volumes.
        shape: (X, Y, Z) voxels per volume.
        seed: generator seed; case i uses ``(seed, i)``.
        lps_fraction: share of cases stored with an LPS header.
        progress: tqdm bar.
        lesion_size_scale, lesion_contrast_scale: scale lesion radii and HU differences
            (:func:`synthetic_ct_volume`).

    Returns:
        Dict with ``per_case`` facts (lesions, spacing, orientation) and ``summary`` class
        statistics (see :func:`class_statistics`), also written to ``synthetic.json``.
    """
    out = Path(out_dir)
    for folder in ("images", "labels"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    settings = {"n_cases": n_cases, "shape": list(shape), "seed": seed, "lps_fraction": lps_fraction,
                "generator_version": 1}
    scales = (lesion_size_scale, lesion_contrast_scale)
    if scales != (1.0, 1.0):  # recorded only when used: older sets stay valid
        settings.update(lesion_size_scale=lesion_size_scale, lesion_contrast_scale=lesion_contrast_scale)
    manifest = out / "synthetic.json"
    if (old := _finished_set(out, settings)) is not None:
        return old
    per_case, labels = [], []
    for i in tqdm(range(n_cases), desc="synthetic CT", unit="vol", disable=not progress):
        image, label, affine, facts = synthetic_ct_volume(shape, hash_seed(seed, i), *scales)
        labels.append(label)
        lps = np.random.default_rng(hash_seed(seed, i, 1)).random() < lps_fraction
        _write_synthetic_case(out, f"liver_{i}", image, label, affine, lps)
        facts.update(case=f"liver_{i}", orientation="LPS" if lps else "RAS", n_lesions=len(facts["lesions"]))
        per_case.append(facts)
    summary = class_statistics(labels)
    summary["lesions_per_case"] = [p["n_lesions"] for p in per_case]
    summary["tumor_free_cases"] = sum(p["n_lesions"] == 0 for p in per_case)
    result = json.loads(json.dumps({"settings": settings, "per_case": per_case, "summary": summary},
                                   default=float))
    _atomic_write_text(manifest, json.dumps(result, indent=1))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python unet_helpers.py predict OUTPUT_DIR CT.nii.gz [CT2 ...] --out FOLDER``."""
    import argparse
    ap = argparse.ArgumentParser(prog="python unet_helpers.py", description="Liver and tumour labels for CT files "
                                 "with a run trained by liver_segmentation.ipynb.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="segment CT files (NIfTI) with a trained run")
    p.add_argument("run", help="the run's folder (the notebook's OUTPUT_DIR)")
    p.add_argument("cts", nargs="+", help="CT volumes (.nii / .nii.gz)")
    p.add_argument("--out", required=True, help="folder for NAME_pred.nii.gz and the colour tables")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    a = ap.parse_args(argv)
    try:
        written = predict_files(a.run, a.cts, a.out, a.device)
    except (ValueError, OSError, KeyError, RuntimeError, pickle.UnpicklingError) as err:  # CTDataError: ValueError
        # a bad input, an unwritable --out, a folder that is not a finished run, a device this machine lacks
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(written)} prediction(s) in {a.out} (labels 0 background, 1 liver, 2 tumour; colour tables there)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
