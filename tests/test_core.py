"""Hand-computed checks of the module's core: the loss's smoothing, the U-Net's skip
connection, the resize of the logits before the softmax at inference, the learning-rate schedule and the HU
window at inference.

Each expected number is worked out in the docstring, not taken from the code under test. Tiny tensors, CPU only:
every test runs in well under a second (tools/mutation_check.py runs this file first, for each mutation).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import write_nifti

import unet_helpers as uh


def _two_pixels() -> tuple[torch.Tensor, torch.Tensor]:
    """The two pixels of test_hand_computed's loss test: softmax exactly p (logits = log p), targets 1 and 2."""
    p = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.2, 0.7]])  # pixel 0, pixel 1; classes 0, 1, 2
    return p.log().T.reshape(1, 3, 1, 2), torch.tensor([[[1, 2]]])


# ---------------------------------------------------------------- loss
def test_dice_smoothing_in_numerator_and_denominator_by_hand():
    """Smooth s = 1 on the two pixels: class 1 tp 0.5, fp 0.2, fn 0.5 -> (0.5 + 1) / (0.5 + 0.1 + 0.25 + 1)
    = 1.5 / 1.85; class 2 tp 0.7, fp 0.3, fn 0.3 -> (0.7 + 1) / (0.7 + 0.15 + 0.15 + 1) = 1.7 / 2 = 0.85;
    Dice loss 1 - (1.5 / 1.85 + 0.85) / 2 = 0.1696.
    A perfect call (logits 200 on the true class: the others' exp(-200) is 0 in float32) of a slice without tumour:
    liver (16 + s) / (16 + s) = 1, tumour tp = fp = fn = 0 -> s / s = 1: Dice loss exactly 0 (not 0 / 0, not 0.5)."""
    logits, target = _two_pixels()
    _, parts = uh.make_loss("dice_ce", smooth=1.0)(logits, target)
    assert parts["dice"].item() == pytest.approx(1 - (1.5 / 1.85 + 0.85) / 2, abs=1e-6)
    y = torch.zeros(1, 8, 8, dtype=torch.long)
    y[:, 2:6, 2:6] = 1  # 16 liver pixels, no tumour
    perfect = torch.nn.functional.one_hot(y, 3).permute(0, 3, 1, 2).float() * 200
    for name in ("dice_ce", "dice_ce_per_slice"):
        total, parts = uh.make_loss(name)(perfect, y)
        assert parts["ce"].item() == 0.0 and parts["dice"].item() == 0.0 and total.item() == 0.0, name


# ---------------------------------------------------------------- U-Net skip connection
def test_up_block_adds_the_skip_to_the_upsampled_map_by_hand():
    """An Up block (2 -> 1 channel, transposed conv, 1 skip channel) wired by hand to add its two inputs:
    the transposed conv (all weights 1, bias 0) copies x's channel sum into each 2x2 block; the first 3x3 conv
    takes the centre tap of both the skip (channel 0: the concatenation puts the skip first) and the upsampled
    map, the second conv passes its input on. BatchNorm in eval mode with fresh statistics divides by
    sqrt(1 + 1e-5) twice; the ReLUs pass the positive sums. So the output is (skip + upsampled x) / 1.00001:
    x = [[1, 2], [3, 4]] (second channel 0) -> [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]],
    plus skip = 10, 20, ..., 160 row by row."""
    up = uh.Up(2, 1, 1, mode="transpose").eval()
    with torch.no_grad():
        up.up.weight.fill_(1.0)
        up.up.bias.zero_()
        first, second = up.conv[0], up.conv[3]
        first.weight.zero_()
        first.weight[0, :, 1, 1] = 1.0  # skip and upsampled map, centre taps
        second.weight.zero_()
        second.weight[0, 0, 1, 1] = 1.0
        x = torch.zeros(1, 2, 2, 2)
        x[0, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        skip = torch.arange(10.0, 161.0, 10.0).reshape(1, 1, 4, 4)
        out = up(x, skip)
    upsampled = torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])
    torch.testing.assert_close(out[0, 0], (skip[0, 0] + upsampled) / 1.00001, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- inference: resize the logits, then softmax
class _Ramp(torch.nn.Module):
    """A stand-in network with 2 classes: background logit 0.5 everywhere, foreground logit running from 0 to 4
    down the first image axis (2 pixels: 0, 4), the same in every column."""

    def forward(self, x):
        out = torch.zeros(x.shape[0], 2, *x.shape[-2:])
        out[:, 0] = 0.5
        out[:, 1] = torch.linspace(0.0, 4.0, x.shape[-2])[:, None]
        return out


def test_slice_probabilities_resize_logits_bilinearly_before_the_softmax():
    """2 -> 4 pixels, bilinear, align_corners False: output pixel i samples source (i + 0.5) / 2 - 0.5 = -0.25
    (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1), so the foreground logit is 0, 1, 3, 4; with 2 classes the
    softmax is sigmoid(logit - 0.5): p_fg = sigmoid(-0.5, 0.5, 2.5, 3.5) = 0.3775, 0.6225, 0.9241, 0.9707.
    (Nearest: logits 0, 0, 4, 4 -> 0.3775 at pixel 1; softmax first, then resize: 0.75 * 0.3775 + 0.25 * 0.9707
    = 0.5258 at pixel 1.) The labels are the argmax at the output grid: 0, 1, 1, 1 (labels taken on the
    network's 2-pixel grid, 0 and 1, resized would give 0, 0, 1, 1)."""
    slices = np.zeros((1, 2, 2), np.float32)
    ((start, probs),) = list(uh.slice_probabilities(_Ramp(), slices, (4, 2), 1, "cpu"))
    assert start == 0 and probs.shape == (1, 2, 4, 2)
    expected = 1 / (1 + np.exp(-np.array([-0.5, 0.5, 2.5, 3.5])))
    for column in range(2):
        np.testing.assert_allclose(probs[0, 1, :, column].numpy(), expected, atol=1e-6)
        np.testing.assert_allclose(probs[0, 0, :, column].numpy(), 1 - expected, atol=1e-6)
    labels = uh.predict_slices(_Ramp(), slices, (4, 2), 1, "cpu")
    np.testing.assert_array_equal(labels[:, :, 0], [[0, 0], [1, 1], [1, 1], [1, 1]])


# ---------------------------------------------------------------- learning-rate schedule
def test_learning_rate_warm_up_then_cosine_to_zero_by_hand():
    """4 steps an epoch, 2 epochs: 8 steps; warm-up 0.5 epoch = 2 steps. Peak lr 0.1 times
    steps 0, 1 (linear warm-up, (step + 1) / 2): 1/2, 1;
    steps 2 .. 8 (cosine over the 6 steps left, 0.5 * (1 + cos(pi * (step - 2) / 6))): 1, 0.9330, 0.75, 0.5,
    0.25, 0.0670 and, after the last step, 0."""
    cfg = uh.TrainConfig(epochs=2, lr=0.1, warmup_epochs=0.5, amp=False)
    state = uh.make_train_state(torch.nn.Conv2d(1, 1, 1), cfg, 4, torch.device("cpu"))
    seen = []
    for _ in range(8):
        seen.append(state.opt.param_groups[0]["lr"])
        state.opt.step()  # no gradients: the weights stay; the scheduler sees a step taken
        state.sched.step()
    seen.append(state.opt.param_groups[0]["lr"])
    cosine = [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(7)]
    assert seen == pytest.approx([0.1 * f for f in [0.5, 1.0, *cosine]], abs=1e-9)
    assert cosine[1] == pytest.approx(0.9330, abs=1e-4) and cosine[6] == pytest.approx(0.0, abs=1e-12)


def test_a_one_epoch_stage_warms_up_for_half_its_steps_then_decays():
    """1 epoch of 4 steps with the default 1-epoch warm-up: the warm-up is cut to half the steps (2), so the
    learning rate decays too: factors 1/2, 1, then 0.5 * (1 + cos(pi * k / 2)) for k = 0, 1, 2: 1, 0.5, 0."""
    state = uh.make_train_state(torch.nn.Conv2d(1, 1, 1), uh.TrainConfig(epochs=1, lr=0.1, amp=False), 4,
                                   torch.device("cpu"))
    seen = []
    for _ in range(4):
        seen.append(state.opt.param_groups[0]["lr"])
        state.opt.step()
        state.sched.step()
    seen.append(state.opt.param_groups[0]["lr"])
    assert seen == pytest.approx([0.05, 0.1, 0.1, 0.05, 0.0], abs=1e-9)


# ---------------------------------------------------------------- HU window at inference
class _Recorder(torch.nn.Module):
    """A stand-in network that keeps its inputs and calls everything background."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return torch.zeros(x.shape[0], 3, *x.shape[-2:])


def test_predict_volume_windows_with_its_hu_window(tmp_path):
    """An 8x8x2 CT, air (-1000 HU) in rows 0-3, 25 HU in rows 4-7, at the network's size (no resize).
    Window (-200, 250): air -> 0, 25 HU -> (25 + 200) / 450 = 0.5 (the default (-100, 400) would give
    (25 + 100) / 500 = 0.25); both exact in float16."""
    ct = np.full((8, 8, 2), -1000, np.int16)
    ct[4:] = 25
    path = write_nifti(tmp_path / "ct.nii.gz", ct)
    net = _Recorder()
    out = uh.predict_volume(net, path, 8, 1, hu_window=(-200, 250), postprocess_pred=False)
    assert out.shape == (8, 8, 2) and not out.any()
    seen = torch.cat(net.inputs)  # (Z, context, X, Y)
    assert seen.shape == (2, 1, 8, 8)
    expected = np.zeros((8, 8), np.float32)
    expected[4:] = 0.5
    for z in range(2):
        np.testing.assert_array_equal(seen[z, 0].numpy(), expected)
