"""Shared fixtures: tiny NIfTI writers, a small synthetic set, the real CT samples."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import unet_helpers as uh  # noqa: E402

# every test file, run alone or with the others, on 2 threads: the CI machine's core count changes no result
torch.set_num_threads(2)

REAL_CT = Path(os.environ.get("LIVER_REAL_CT_DIR", ROOT.parent / "shared" / "data" / "real_ct"))


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write ``array`` as NIfTI at ``path`` (folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def tiny_ct(shape=(16, 16, 6), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A small CT-like int16 image (air, soft tissue) and a 0/1/2 label."""
    rng = np.random.default_rng(seed)
    img = np.full(shape, -1000, np.int16)
    img[2:-2, 2:-2] = rng.normal(40, 10, (shape[0] - 4, shape[1] - 4, shape[2])).astype(np.int16)
    lab = np.zeros(shape, np.uint8)
    lab[8:13, 4:12, 1:5] = 1
    lab[10:12, 6:8, 2:4] = 2
    return img, lab


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small synthetic set (6 cases of 64x64x24) shared by the tests."""
    out = tmp_path_factory.mktemp("synthetic")
    uh.make_synthetic_dataset(out, n_cases=6, shape=(64, 64, 24), seed=3, progress=False)
    return out


def shared_or_skip(folder: Path, probe: str, what: str) -> Path:
    """``folder`` when ``folder / probe`` exists, else skip the test and say why."""
    if not (folder / probe).exists():
        pytest.skip(f"{what} not found at {folder} (they live in ../shared, which a user's clone does not have)")
    return folder


@pytest.fixture()
def real_ct() -> Path:
    """Folder with the real CT samples, or skip."""
    return shared_or_skip(REAL_CT, "abdomen_ct_3mm_ras.nii.gz", "real CT samples")


REAL_SLICES = Path(os.environ.get("LIVER_REAL_SLICES_DIR", ROOT.parent / "shared" / "data" / "real_liver_slices"))


@pytest.fixture()
def real_slices() -> Path:
    """Folder with the real LiTS-derived liver slices, or skip."""
    return shared_or_skip(REAL_SLICES, "images", "real liver slices")
