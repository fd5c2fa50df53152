"""Hand-computed expected values for the loss, the augmentation and the orientation round trip.

Each expected number is worked out in the comments, not taken from the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import write_nifti

import unet_helpers as uh


def test_soft_dice_ce_loss_by_hand():
    # one image of 2 pixels; logits = log(p) so that the softmax is exactly p
    p = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.2, 0.7]])  # pixel 0, pixel 1; classes 0, 1, 2
    logits = p.log().T.reshape(1, 3, 1, 2)
    target = torch.tensor([[[1, 2]]])
    total, parts = uh.make_loss("dice_ce", smooth=0.0)(logits, target)
    # CE = mean(-log 0.5, -log 0.7)
    ce = (-math.log(0.5) - math.log(0.7)) / 2
    # class 1: tp 0.5, fp 0.2, fn 0.5 -> 0.5 / (0.5 + 0.1 + 0.25); class 2: tp 0.7, fp 0.3, fn 0.3 -> 0.7 / 1.0
    dice_loss = 1 - (0.5 / 0.85 + 0.7) / 2
    assert parts["ce"].item() == pytest.approx(ce, abs=1e-6)
    assert parts["dice"].item() == pytest.approx(dice_loss, abs=1e-6)
    assert total.item() == pytest.approx(ce + dice_loss, abs=1e-6)


def test_augmentation_keeps_labels_and_moves_image_with_label():
    y = torch.zeros(4, 32, 32, dtype=torch.long)
    y[:, 8:24, 6:20] = 1
    y[:, 12:18, 10:15] = 2
    x = (y.float() / 2)[:, None]  # the image encodes its label: 0, 0.5, 1
    gen = torch.Generator().manual_seed(0)
    xa, ya = uh.augment_batch(x, y, gen, uh.Augmentation(intensity=0.0, noise=0.0, p=1.0))
    assert set(torch.unique(ya).tolist()) <= {0, 1, 2}
    assert not torch.equal(ya, y)  # something moved
    agree = (torch.round(xa[:, 0] * 2).long() == ya).float().mean().item()
    assert agree > 0.97  # image and label moved together (bilinear vs nearest differ on edges only)
    assert (ya == 2).sum() > 0.7 * (y == 2).sum()  # the lesion survives scaling by at most 15 %


def test_orientation_round_trip_with_permuted_axes(tmp_path):
    data = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3) - 1000  # CT-like values
    data[0, 0, :] = 40
    # file axis 0 runs along world +y (anterior, 1.5 mm), axis 1 along world +x (right, 2 mm), axis 2 along +z
    affine = np.array([[0, 2.0, 0, 0], [1.5, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])
    path = write_nifti(tmp_path / "perm.nii.gz", data, affine)
    case = uh.load_case(path)
    # canonical RAS: array axis 0 = x = file axis 1, axis 1 = y = file axis 0
    np.testing.assert_array_equal(case.image, data.transpose(1, 0, 2).astype(np.float32))
    assert tuple(case.spacing) == (2.0, 1.5, 3.0)
    np.testing.assert_array_equal(uh.from_canonical(case.image, case.source_affine), data)


def test_mirroring_flips_image_and_labels_exactly():
    """``Augmentation(mirror=1)`` with no other change: every sample flipped left-right and up-down, pixel for
    pixel; with a chance of one half, some samples flipped on one axis only, some on both, some not at all; 0
    flips nothing."""
    x = torch.rand(64, 2, 6, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (64, 6, 8), generator=torch.Generator().manual_seed(1))
    still = {"rotate_deg": 0.0, "scale": (1.0, 1.0), "translate": 0.0, "intensity": 0.0, "noise": 0.0, "p": 1.0}
    xm, ym = uh.augment_batch(x, y, torch.Generator().manual_seed(2), uh.Augmentation(mirror=1.0, **still))
    assert torch.allclose(xm, x.flip(-1).flip(-2), atol=1e-6) and torch.equal(ym, y.flip(-1).flip(-2))
    xh, yh = uh.augment_batch(x, y, torch.Generator().manual_seed(3), uh.Augmentation(mirror=0.5, **still))
    kinds = []
    for i in range(64):  # each sample is one of the four flips of itself, labels flipped with their image
        for name, f in {"none": lambda t: t, "lr": lambda t: t.flip(-1), "ud": lambda t: t.flip(-2),
                        "both": lambda t: t.flip(-1).flip(-2)}.items():
            if torch.allclose(xh[i], f(x[i]), atol=1e-6):
                assert torch.equal(yh[i], f(y[i]))
                kinds.append(name)
                break
    assert len(kinds) == 64 and set(kinds) == {"none", "lr", "ud", "both"}  # 64 draws: all four (1 - 4 * 0.75^64)
    x0, y0 = uh.augment_batch(x, y, torch.Generator().manual_seed(4), uh.Augmentation(mirror=0.0, **still))
    assert torch.allclose(x0, x, atol=1e-6) and torch.equal(y0, y)  # off: nothing flipped


def test_lesion_contrast_by_hand():
    # 8x8 slices: liver 0.5 in rows/cols 1..6, a 2x2 lesion at rows/cols 3..4 -- 0.3 in slice 0 (d = -0.2),
    # 0.25 in slice 1 (d = -0.25); channel 0 is a neighbour slice: liver 0.6 and its own lesion at 0.2
    y = torch.zeros(3, 8, 8, dtype=torch.long)
    y[:, 1:7, 1:7] = 1
    y[:, 3:5, 3:5] = 2
    y[2, 1:7, 1:7] = torch.where(y[2, 1:7, 1:7] == 2, 2, 0)  # slice 2: tumour but no liver -> left alone
    x = torch.full((3, 3, 8, 8), 0.5)
    x[:, :, 3:5, 3:5] = 0.3
    x[1, :, 3:5, 3:5] = 0.25
    x[:, 0] += 0.1
    x[:, 0, 3:5, 3:5] = 0.2
    # draws: slice 0 on, k = 0.5 + 0.25 * 1.0 = 0.75, kept positive; slice 1 on, k = 1.0, flipped to -1.0;
    # slice 2 on but without liver
    draws = torch.tensor([[0.1, 0.1, 0.1], [0.25, 0.5, 0.9], [0.9, 0.2, 0.9]])
    out = uh.lesion_contrast(x, y, draws, p=0.5, magnitude=(0.5, 1.5), flip=0.5)
    # slice 0: d from the centre channel (-0.2; channel 0 would give -0.4), shift (0.75 - 1) * (-0.2) = +0.05
    # -> lesion 0.35 in the centre channel; channel 0 gets the same shift: 0.2 + 0.05
    assert torch.allclose(out[0, 1, 3:5, 3:5], torch.full((2, 2), 0.35))
    assert torch.allclose(out[0, 0, 3:5, 3:5], torch.full((2, 2), 0.25))
    # slice 1: its own d = -0.25 (not the batch's), shift (-1 - 1) * (-0.25) = +0.5 -> 0.75: the hypodense
    # lesion became hyperdense by the same 0.25
    assert torch.allclose(out[1, 1, 3:5, 3:5], torch.full((2, 2), 0.75))
    # the pixel left of the lesion, (3, 2): 2 of its 9 neighbours are tumour -> 0.5 + 0.5 * 2 / 9
    assert out[1, 1, 3, 2].item() == pytest.approx(0.5 + 0.5 * 2 / 9, abs=1e-6)
    # its diagonal neighbour (2, 2) touches 1 tumour pixel -> 0.5 + 0.5 / 9; two pixels away: unchanged
    assert out[1, 1, 2, 2].item() == pytest.approx(0.5 + 0.5 / 9, abs=1e-6)
    assert out[1, 1, 1, 1].item() == pytest.approx(0.5) and out[1, 1, 3, 0].item() == pytest.approx(0.5)
    assert torch.equal(out[2], x[2])  # no liver in the label: no reference, nothing changed
    off = uh.lesion_contrast(x, y, torch.tensor([[0.6, 0.6, 0.6], [0.0, 0.0, 0.0], [0.9, 0.9, 0.9]]), p=0.5)
    assert torch.equal(off, x)  # p not drawn for any slice


def test_lesion_contrast_is_drawn_after_every_other_augmentation():
    y = torch.zeros(4, 16, 16, dtype=torch.long)
    y[:, 2:14, 2:14] = 1
    y[:, 6:10, 6:10] = 2
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    plain, yp = uh.augment_batch(x, y, torch.Generator().manual_seed(4))
    never, yn = uh.augment_batch(x, y, torch.Generator().manual_seed(4), uh.Augmentation(lesion_p=0.0))
    assert torch.equal(plain, never) and torch.equal(yp, yn)  # off, it changes no other draw
    always, ya = uh.augment_batch(x, y, torch.Generator().manual_seed(4), uh.Augmentation(lesion_p=1.0))
    assert torch.equal(ya, yp)
    moved = (always - plain).abs() > 1e-6
    assert moved.any() and not moved[:, 0][yp == 0].any()  # only the lesion and its rim change, never far away
    changed_outside = moved[:, 0] & (yp != 2)
    near = torch.nn.functional.max_pool2d((yp == 2).float()[:, None], 3, 1, 1)[:, 0] > 0
    assert not (changed_outside & ~near).any()
