"""Model, loss, training (resume, determinism), evaluation metrics, inference, plots."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import matplotlib
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT, write_nifti

import unet_helpers as uh

matplotlib.use("Agg")


# ---------------------------------------------------------------- U-Net
@pytest.mark.parametrize("in_ch", [1, 3, 5])
@pytest.mark.parametrize("size", [(37, 51), (64, 64), (100, 80)])
def test_unet_shapes_any_size(in_ch, size):
    m = uh.UNet(in_ch, 3, base_channels=4, depth=3)
    out = m(torch.randn(2, in_ch, *size))
    assert out.shape == (2, 3, *size)


@pytest.mark.parametrize("norm,up", [("batch", "bilinear"), ("instance", "transpose")])
def test_unet_gradients_flow(norm, up):
    m = uh.UNet(3, 3, base_channels=4, depth=2, norm=norm, up=up)
    loss, _ = uh.DiceCELoss()(m(torch.randn(2, 3, 33, 33)), torch.randint(0, 3, (2, 33, 33)))
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sum(float(p.grad.abs().sum()) for p in m.parameters()) > 0
    info = uh.describe_model(m, 48)
    assert info["output_shape"] == [2, 3, 48, 48]
    assert info["parameters"] == sum(p.numel() for p in m.parameters())


def test_unet_bad_options():
    with pytest.raises(ValueError, match="norm"):
        uh.UNet(1, norm="group")
    with pytest.raises(ValueError, match="up mode"):
        uh.UNet(1, up="pixelshuffle")


def _toy_slice(size=48, seed=0):
    """One slice: a bright disc (liver) holding a dark blob (tumour), with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    liver = (xx - 26) ** 2 + (yy - 22) ** 2 < 15 ** 2
    tumor = (xx - 30) ** 2 + (yy - 20) ** 2 < 5 ** 2
    img = 0.2 + 0.4 * liver - 0.25 * tumor + rng.normal(0, 0.03, (size, size))
    lab = liver.astype(np.int64) + tumor
    return torch.tensor(img, dtype=torch.float32)[None, None], torch.tensor(lab)[None]


def test_tiny_unet_overfits_one_slice():
    torch.manual_seed(0)
    x, y = _toy_slice()
    m = uh.UNet(1, 3, base_channels=8, depth=2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    loss_fn = uh.DiceCELoss()
    for _step in range(150):
        loss, _ = loss_fn(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    pred = m(x).argmax(1)[0].numpy()
    assert uh.dice(pred == 1, y[0].numpy() == 1) > 0.9
    assert uh.dice(pred == 2, y[0].numpy() == 2) > 0.9


# ---------------------------------------------------------------- loss
def test_dice_ce_loss_parts_and_variants():
    y = torch.zeros(2, 8, 8, dtype=torch.long)
    y[:, 2:6, 2:6] = 1
    y[:, 3:5, 3:5] = 2
    perfect = torch.nn.functional.one_hot(y, 3).permute(0, 3, 1, 2).float() * 40
    total, parts = uh.DiceCELoss()(perfect, y)
    assert parts["ce"] < 1e-6 and parts["dice"] < 1e-4 and total < 1e-3
    wrong = torch.zeros_like(perfect)
    wrong[:, 0] = 40  # predicts background everywhere
    _, bad = uh.DiceCELoss()(wrong, y)
    assert bad["dice"] > 0.99  # both foreground classes missed
    logits = torch.randn(2, 3, 8, 8)
    # per-sample vs batch Dice differ when one sample has no tumour
    y2 = y.clone()
    y2[1][y2[1] == 2] = 1
    b = uh.DiceCELoss(batch_dice=True)(logits, y2)[1]["dice"]
    s = uh.DiceCELoss(batch_dice=False)(logits, y2)[1]["dice"]
    assert not torch.isclose(b, s)
    assert torch.isclose(uh.make_loss("dice_ce_per_slice")(logits, y2)[1]["dice"], s)
    with pytest.raises(ValueError, match="loss must be"):
        uh.make_loss("mse")


# ---------------------------------------------------------------- metrics
def test_dice_hand_computed():
    z = np.zeros(10, bool)
    one = z.copy()
    one[3] = True
    two = one.copy()
    two[4] = True
    assert math.isnan(uh.dice(z, z)) and uh.dice(z, z, empty=1.0) == 1.0  # both empty
    assert uh.dice(one, z) == 0.0  # empty truth, false positive
    assert uh.dice(two, two) == 1.0  # perfect
    other = z.copy()
    other[7] = True
    assert uh.dice(one, other) == 0.0  # disjoint
    assert uh.dice(one, one) == 1.0  # one voxel
    assert uh.dice(two, one) == pytest.approx(2 / 3)


def _vol(shape=(20, 20, 10)):
    return np.zeros(shape, np.uint8)


def test_score_case_lits_convention_and_empty_tumour():
    truth = _vol()
    truth[5:15, 5:15, 2:8] = 1
    truth[8:10, 8:10, 4:6] = 2
    pred = truth.copy()
    pred[pred == 2] = 1  # tumour called liver
    r = uh.score_case(pred, truth, (1, 1, 2))
    assert r["dice_liver_lits"] == 1.0  # label >= 1 vs >= 1
    assert r["dice_liver"] < 1.0 and r["dice_tumor"] == 0.0 and r["has_tumor"]
    t2 = truth.copy()
    t2[t2 == 2] = 1  # tumour-free case with a false-positive tumour
    p2 = t2.copy()
    p2[5:7, 5:7, 2:3] = 2
    r2 = uh.score_case(p2, t2, (1, 1, 2))
    assert math.isnan(r2["dice_tumor"]) and not r2["has_tumor"]
    assert r2["fp_tumor_ml"] == pytest.approx(4 * 2 / 1000)


def test_per_case_vs_global_dice():
    big, small = _vol(), _vol()
    big[2:18, 2:18, 1:9] = 1
    small[9:11, 9:11, 4:5] = 1
    rows = [{"case": "x", **uh._score_with_raw(p, p, t, (1, 1, 1))}
            for t, p in ((big, big), (small, _vol()))]  # big perfect, small missed
    s = uh.summarize(rows)
    assert s["dice_liver"] == pytest.approx(0.5)  # mean of 1 and 0
    n_big, n_small = (big == 1).sum(), (small == 1).sum()
    assert s["dice_liver_global"] == pytest.approx(2 * n_big / (2 * n_big + n_small))
    assert math.isnan(s["dice_tumor"])  # no case has tumour


def test_surface_distances_concentric_spheres():
    g = np.mgrid[:40, :40, :40] - 19.5
    r = np.sqrt((g ** 2).sum(0))
    a, b = r < 10, r < 13
    hd, assd = uh.surface_distances(a, b, (2.0, 2.0, 2.0))
    assert 4.0 <= hd <= 8.0 and 4.0 <= assd <= 7.5  # ~3 voxels x 2 mm
    assert uh.surface_distances(a, a, (1, 1, 1)) == (0.0, 0.0)
    assert all(math.isnan(v) for v in uh.surface_distances(a, np.zeros_like(a), (1, 1, 1)))


def test_postprocess_keeps_largest_component():
    p = _vol()
    p[2:12, 2:12, 2:8] = 1
    p[5:7, 5:7, 4:6] = 2
    p[16:18, 16:18, 1:2] = 1  # a stray island
    q = uh.postprocess(p)
    assert q[16:18, 16:18, 1].sum() == 0 and (q == 2).sum() == 8 and (q == 1).sum() == (p == 1).sum() - 4


# ---------------------------------------------------------------- training
@pytest.fixture(scope="module")
def tiny_data(synthetic_dir, tmp_path_factory):
    cached = uh.preprocess_dataset(uh.find_cases(synthetic_dir), tmp_path_factory.mktemp("cache"), image_size=32,
                                   workers=0, progress=False)
    train, val = cached[:4], cached[4:]
    ts, vs = uh.SliceSet(train, context=3), uh.SliceSet(val, context=3)
    return {"cached": cached, "train": ts, "val": vs, "ti": uh.select_slices(train, 0.2, 0),
            "vi": uh.select_slices(val, 0.2, 0), "val_cases": val}


def _run(data, out, epochs=2, seed=0, **kw):
    uh.set_determinism(seed)
    m = uh.UNet(3, 3, base_channels=4, depth=2)
    cfg = uh.TrainConfig(epochs=epochs, batch_size=8, lr=3e-3, steps_per_epoch=3, sampling=uh.Sampling(0.25), seed=seed)
    h = uh.train(m, data["train"], data["ti"], cfg, out, data["val"], data["vi"], progress=False, **kw)
    return m, h


def _strip(history):
    return [{k: v for k, v in r.items() if k not in ("epoch_seconds", "slices_per_second")} for r in history]


def test_training_logs_checkpoints_and_determinism(tiny_data, tmp_path):
    m1, h1 = _run(tiny_data, tmp_path / "a")
    _, h2 = _run(tiny_data, tmp_path / "b")
    assert _strip(h1) == _strip(h2)  # same seed, same history on CPU
    for f in ("history.csv", "history.json", "last.pt", "best.pt"):
        assert (tmp_path / "a" / f).exists()
    assert not list((tmp_path / "a").glob(".tmp-*"))
    row = h1[-1]
    for k in ("train_ce", "train_dice_loss", "val_ce", "val_dice_loss", "val_dice_liver_2d", "val_dice_tumor_2d",
              "val_dice_mean_2d", "lr", "epoch_seconds", "slices_per_second"):
        assert k in row
    assert json.loads((tmp_path / "a" / "history.json").read_text())[-1]["epoch"] == 2
    assert (tmp_path / "a" / "history.csv").read_text().count("\n") == 3
    ck = uh.load_checkpoint(tmp_path / "a" / "last.pt")
    assert ck["epoch"] == 1 and ck["model_hparams"]["in_channels"] == 3


def test_training_on_patches_with_contrast_balanced_sampling(tiny_data, tmp_path, monkeypatch):
    seen = []
    real = uh.train_step
    monkeypatch.setattr(uh, "train_step", lambda state, x, y, *a: seen.append(x.shape) or real(state, x, y, *a))
    uh.set_determinism(0)
    cfg = uh.TrainConfig(epochs=1, batch_size=8, steps_per_epoch=2,
                         sampling=uh.Sampling(tumor_share=0.5, lesion_balance=True, window=24))
    h = uh.train(uh.UNet(3, 3, base_channels=4, depth=2), tiny_data["train"], tiny_data["ti"], cfg, tmp_path,
                 progress=False)
    assert seen == [(8, 3, 24, 24)] * 2 and np.isfinite(h[-1]["train_ce"])  # 24² windows of the 32² slices


def test_resume_after_kill_gives_same_weights(tiny_data, tmp_path, monkeypatch):
    ref, href = _run(tiny_data, tmp_path / "ref")
    real = uh.augment_batch
    calls = {"n": 0}

    def killer(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 2, second batch
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(uh, "augment_batch", killer)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_data, tmp_path / "run")
    monkeypatch.setattr(uh, "augment_batch", real)
    assert uh.load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 0  # epoch 1 was kept
    resumed, hres = _run(tiny_data, tmp_path / "run")
    assert _strip(hres) == _strip(href)
    for (n, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n


def test_resume_refuses_other_settings(tiny_data, tmp_path):
    _run(tiny_data, tmp_path / "x", epochs=1)
    with pytest.raises(ValueError, match="other training settings"):
        _run(tiny_data, tmp_path / "x", epochs=1, seed=5)


def test_resume_accepts_a_checkpoint_written_before_a_setting_existed(tiny_data, tmp_path):
    _run(tiny_data, tmp_path / "x", epochs=1)
    ck = uh.load_checkpoint(tmp_path / "x" / "last.pt")
    del ck["train_config"]["amp"]  # settings added later: an older checkpoint lacks them
    del ck["train_config"]["augment"]["mirror"]
    torch.save(ck, tmp_path / "x" / "last.pt")
    _run(tiny_data, tmp_path / "x", epochs=1)  # their defaults are what that run used: resumes
    ck["train_config"]["sampling"]["lesion_balance"] = True  # but a stored value that differs is still refused
    torch.save(ck, tmp_path / "x" / "last.pt")
    with pytest.raises(ValueError, match="sampling.lesion_balance: True -> False"):
        _run(tiny_data, tmp_path / "x", epochs=1)
    ck["train_config"]["patch_size"] = None  # a setting that no longer exists: written by an older version
    torch.save(ck, tmp_path / "x" / "last.pt")
    with pytest.raises(ValueError, match=r"older unet_helpers.*\['patch_size'\]"):
        _run(tiny_data, tmp_path / "x", epochs=1)


def test_resume_ignores_the_recipe_keys_used_only_after_training(tiny_data, tmp_path):
    rec = {"context": 1, "cascade": False, "stage2_window_fraction": None, "stage1_share": None,
           "stage2_mirror": False}
    _run(tiny_data, tmp_path / "x", epochs=1, run=uh.run_identity({"RECIPE_SETTINGS": rec}, ["liver_0"], "data"))
    floor = {**rec, "min_tumor_ml": 0.1}  # a post-processing setting: the same training run
    assert uh.run_identity({"RECIPE_SETTINGS": floor}, ["liver_0"], "data") == uh.run_identity(
        {"RECIPE_SETTINGS": rec}, ["liver_0"], "data")
    _run(tiny_data, tmp_path / "x", epochs=1, run=uh.run_identity({"RECIPE_SETTINGS": floor}, ["liver_0"], "data"))


def test_training_augments_every_step_as_its_config_says(tiny_data, tmp_path, monkeypatch):
    """``TrainConfig.augment`` reaches the augmentation of every step; None augments nothing."""
    seen, augment = [], uh.augment_batch
    monkeypatch.setattr(uh, "augment_batch", lambda x, y, gen, aug, window: seen.append(aug.mirror)
                        or augment(x, y, gen, aug, window))
    for aug in (uh.Augmentation(), uh.Augmentation(mirror=0.5), None):
        uh.set_determinism(0)
        cfg = uh.TrainConfig(epochs=1, batch_size=8, lr=3e-3, steps_per_epoch=2, seed=0, augment=aug)
        uh.train(uh.UNet(3, 3, base_channels=4, depth=2), tiny_data["train"], tiny_data["ti"], cfg,
                 tmp_path / str(aug), progress=False)
    assert seen == [0.0, 0.0, 0.5, 0.5]


def test_load_run_rebuilds_both_stages(synthetic_dir, tmp_path):
    """``uh.load_run`` rebuilds stage 1, stage 2 and the settings from a run folder alone: its prediction equals
    ``predict_volume`` with the same networks in memory, voxel for voxel, and differs without stage 2."""
    torch.manual_seed(0)
    nets = {"": uh.UNet(3, 3, base_channels=4, depth=2), "stage2": uh.UNet(3, 3, base_channels=4, depth=2)}
    # stage 1 calls liver everywhere (its output bias) and stage 2 never background, so the labels show whether
    # stage 2 was loaded: its random weights call tumour where stage 1 alone has liver
    for net, bias in ((nets[""], [0.0, 3.0, 0.0]), (nets["stage2"], [-3.0, 0.0, 0.0])):
        [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)][-1].bias.data = torch.tensor(bias)
    rec = {**uh.recipe("default"), "postprocess": False}
    settings = {"IMAGE_SIZE": 32, "CONTEXT_SLICES": 3, "HU_WINDOW": [-100.0, 400.0], "CASCADE": True, "ROI_SIZE": 32,
                "CASCADE_CORE_MM": 2.0, "EVAL_CHECKPOINT": "last", "RECIPE_SETTINGS": rec}
    for sub, net in nets.items():
        (tmp_path / sub).mkdir(exist_ok=True)
        torch.save({"model": net.state_dict(), "model_hparams": net.hparams, "extra": {"settings": settings}},
                   tmp_path / sub / "last.pt")
    ct = synthetic_dir / "images" / "liver_4.nii.gz"
    stage2 = uh.Stage2(nets["stage2"], 32, core_mm=2.0, mirror=True, average_liver=True)
    expected = uh.predict_volume(nets[""], ct, 32, 3, (-100.0, 400.0), postprocess_pred=False, stage2=stage2)
    got = uh.load_run(tmp_path, "cpu").predict(ct, tmp_path / "pred.nii.gz")
    assert np.array_equal(got, expected) and (got == 2).any()
    no_stage2 = uh.predict_volume(nets[""], ct, 32, 3, (-100.0, 400.0), postprocess_pred=False)
    assert not np.array_equal(got, no_stage2)  # stage 2 was loaded and used
    assert np.array_equal(np.asanyarray(nib.load(str(tmp_path / "pred.nii.gz")).dataobj), got)


def test_load_run_takes_the_scoring_choices_of_the_same_run(synthetic_dir, tmp_path):
    """After training, ``metrics.json`` of the same run supplies what was chosen later (``EVAL_CHECKPOINT``, the
    tumour-speck floor); a ``metrics.json`` of another run in the folder is ignored."""
    torch.manual_seed(1)
    nets = {name: uh.UNet(1, 3, base_channels=4, depth=2) for name in ("last", "best")}
    for net, bias in ((nets["last"], [0.0, 3.0, 0.0]), (nets["best"], [0.0, 0.0, 3.0])):
        [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)][-1].bias.data = torch.tensor(bias)
    rec = {**uh.recipe("baseline"), "postprocess": True, "min_tumor_ml": 0.0}
    settings = {"RECIPE": "baseline", "IMAGE_SIZE": 32, "CONTEXT_SLICES": 1, "HU_WINDOW": [-100.0, 400.0],
                "CASCADE": False, "EVAL_CHECKPOINT": "last", "RECIPE_SETTINGS": rec}
    for name, net in nets.items():
        torch.save({"model": net.state_dict(), "model_hparams": net.hparams, "extra": {"settings": settings}},
                   tmp_path / f"{name}.pt")
    ct = synthetic_dir / "images" / "liver_4.nii.gz"
    assert (uh.load_run(tmp_path, "cpu").predict(ct) == 1).all()  # no metrics.json: the checkpoint's choice, last
    scored = {**settings, "EVAL_CHECKPOINT": "best", "RECIPE_SETTINGS": {**rec, "min_tumor_ml": 1e9}}
    (tmp_path / "metrics.json").write_text(json.dumps({"config": scored}))
    run = uh.load_run(tmp_path, "cpu")  # "best" calls tumour everywhere; the floor removes it (no liver to join)
    assert run.settings["EVAL_CHECKPOINT"] == "best" and (run.predict(ct) == 0).all()
    assert (uh.predict_volume(nets["best"], ct, 32, 1, postprocess_pred=False) == 2).all()
    (tmp_path / "metrics.json").write_text(json.dumps({"config": {**scored, "IMAGE_SIZE": 64}}))  # another run
    assert uh.load_run(tmp_path, "cpu").settings["EVAL_CHECKPOINT"] == "last"


def test_train_runs_the_step_it_is_given(tiny_data, tmp_path):
    """``uh.train(..., step=f)`` calls ``f`` once per optimizer step (2 epochs x 3 steps), with the config's grad
    clip, and what it returns is the epoch's logged loss."""
    calls = []

    def step(state, x, y, grad_clip):
        calls.append((tuple(x.shape), grad_clip))
        return torch.tensor(0.5), {"ce": torch.tensor(0.25), "dice": torch.tensor(0.75)}

    cfg = uh.TrainConfig(epochs=2, batch_size=8, steps_per_epoch=3, grad_clip=0.7)
    h = uh.train(uh.UNet(3, 3, base_channels=4, depth=2), tiny_data["train"], tiny_data["ti"], cfg, tmp_path,
                 progress=False, step=step)
    assert calls == [((8, 3, 32, 32), 0.7)] * 6
    assert [(r["train_ce"], r["train_dice_loss"]) for r in h] == [(0.25, 0.75)] * 2


def test_recipe_augmentation_follows_the_recipe_keys():
    """Lesion contrast on half the tumour slices where ``lesion_augment``; mirrors (chance 1/2 per axis) on stage 2
    only, where ``stage2_mirror``; the baseline gets the plain draws."""
    default = uh.recipe("default")
    assert uh.recipe_augmentation(uh.recipe("baseline")) == uh.Augmentation()
    assert uh.recipe_augmentation(default) == uh.Augmentation(lesion_p=0.5)
    assert uh.recipe_augmentation(default, stage2=True) == uh.Augmentation(lesion_p=0.5, mirror=0.5)
    cfg = uh.recipe_train_config(default, 3, 8, 1e-3, stage=2, window=64)
    assert cfg.sampling == uh.Sampling(default["tumor_share"], default["liver_share"], True, 64)
    assert uh.recipe_train_config(default, 3, 8, 1e-3, stage=2, window=0).sampling.window is None  # whole boxes


def test_resume_refuses_another_run_and_says_what_differs(tiny_data, tmp_path):
    settings = {"IMAGE_SIZE": 32, "HU_WINDOW": [-100, 400], "RESUME": True}
    run = uh.run_identity(settings, ["liver_0", "liver_1"], "data")
    _run(tiny_data, tmp_path / "x", epochs=1, run=run)
    again = uh.run_identity({**settings, "RESUME": False}, ["liver_0", "liver_1"], "data")  # not a RUN_KEY
    assert again == run
    _run(tiny_data, tmp_path / "x", epochs=1, run=again)  # same run: resumes (nothing left to train)
    other = uh.run_identity({**settings, "HU_WINDOW": [-200, 250]}, ["liver_0", "liver_1"], "data")
    with pytest.raises(ValueError, match=r"HU_WINDOW: \[-100, 400\] -> \[-200, 250\]"):
        _run(tiny_data, tmp_path / "x", epochs=1, run=other)
    moved = uh.run_identity(settings, ["liver_0", "liver_2"], "data")  # another split
    with pytest.raises(ValueError, match="train_cases"):
        _run(tiny_data, tmp_path / "x", epochs=1, run=moved)


def test_weights_only_refuses_pickled_objects(tmp_path):
    torch.save({"model": {}, "payload": uh.TrainConfig()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        uh.load_checkpoint(tmp_path / "evil.pt")


# ---------------------------------------------------------------- evaluation, inference, results, plots
def test_evaluate_metrics_and_plots(tiny_data, tmp_path):
    m, h = _run(tiny_data, tmp_path / "run")
    ev = uh.evaluate(m, tiny_data["val_cases"], 3, "cpu", postprocess_pred=True, progress=False,
                     save_dir=tmp_path / "predictions")
    assert len(ev["per_case"]) == 2
    for c in tiny_data["val_cases"]:  # saved in the input's own grid; equal to the canonical prediction
        saved = uh.load_case(c.meta["image_path"], tmp_path / "predictions" / f"{c.case_id}_pred.nii.gz")
        np.testing.assert_array_equal(saved.label, ev["predictions"][c.case_id])
    assert [r["case"] for r in ev["lesions"]] == [c.case_id for c in tiny_data["val_cases"]]
    assert "nnU-Net convention" in uh.describe_results(ev["summary"], True)
    for r in ev["per_case"]:
        assert 0 <= r["dice_liver_lits"] <= 1 and "dice_liver_raw" in r and "hd95_liver_lits_mm" in r
        assert ev["predictions"][r["case"]].shape == tuple(tiny_data["val_cases"][0].label_full.shape)
    s = ev["summary"]
    for k in ("dice_liver", "dice_tumor", "dice_mean", "dice_liver_lits", "dice_liver_global", "dice_tumor_global"):
        assert k in s
    path = uh.write_metrics(tmp_path, {"RECIPE": "default"}, uh.environment(), {"train_seconds": 1.0},
                            ev["per_case"], s)
    body = json.loads(path.read_text())  # NaN written as null: valid JSON
    assert set(body) >= {"config", "env", "timing", "per_case", "summary"}
    lesions = [les for r in ev["lesions"] for les in r["lesions"]]
    assert lesions and all("contrast_hu" in les for les in lesions)  # every case with tumour: the CT is read
    assert sum(s["lesion_count_by_contrast"].values()) == len(lesions)
    uh.plot_history(h, tmp_path, stage2_history=h, scored=[len(h), 2 * len(h)])
    uh.plot_per_case(ev["per_case"], tmp_path)
    uh.plot_overlays(tiny_data["val_cases"], ev["predictions"], ev["per_case"], tmp_path)
    case = tiny_data["val_cases"][0]
    uh.plot_montage(case, ev["predictions"][case.case_id], output_dir=tmp_path)
    uh.plot_lesions(ev["lesions"], tmp_path)
    for f in ("training_curves.png", "per_case_dice.png", "overlays.png", "montage.png", "lesions.png"):
        assert (tmp_path / f).stat().st_size > 10_000


def test_inference_batch_size_and_batching_do_not_change_labels():
    assert uh.inference_batch_size("cpu", 128) == 8 and uh.inference_batch_size("cpu", 256) == 1
    assert uh.inference_batch_size("cuda", 256) == 32
    torch.manual_seed(0)
    m = uh.UNet(3, 3, 4, 2).eval()
    slices = np.random.default_rng(0).random((7, 16, 16), dtype=np.float32)
    one = uh.predict_slices(m, slices, (20, 20), 3, "cpu", batch_size=1)
    assert one.shape == (20, 20, 7)
    np.testing.assert_array_equal(uh.predict_slices(m, slices, (20, 20), 3, "cpu"), one)
    np.testing.assert_array_equal(uh.predict_slices(m, slices, (20, 20), 3, "cpu", batch_size=5), one)


def test_predict_volume_keeps_input_grid_ras_and_lps(synthetic_dir, tmp_path):
    m = uh.UNet(3, 3, base_channels=4, depth=2)
    src = nib.load(str(synthetic_dir / "images" / "liver_0.nii.gz"))
    data = np.asanyarray(src.dataobj)
    lps_img, lps_aff = uh._to_lps(data, src.affine) if nib.aff2axcodes(src.affine)[0] == "R" else (data, src.affine)
    ras_img, ras_aff = uh._to_lps(lps_img, lps_aff)  # flipping twice gives RAS back
    write_nifti(tmp_path / "ras.nii.gz", ras_img, ras_aff)
    write_nifti(tmp_path / "lps.nii.gz", lps_img, lps_aff)
    outs = {}
    for name in ("ras", "lps"):
        outs[name] = uh.predict_volume(m, tmp_path / f"{name}.nii.gz", 32, 3, out_path=tmp_path / f"{name}_pred.nii.gz")
        saved = nib.load(str(tmp_path / f"{name}_pred.nii.gz"))
        assert saved.shape == data.shape
        assert np.allclose(saved.affine, nib.load(str(tmp_path / f"{name}.nii.gz")).affine)
        assert saved.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asanyarray(saved.dataobj), outs[name])
    np.testing.assert_array_equal(outs["ras"][::-1, ::-1], outs["lps"])  # same anatomy, same labels


def test_predict_volume_real_lps_ct(real_ct, tmp_path):
    m = uh.UNet(1, 3, base_channels=4, depth=2)
    path = real_ct / "chest_abdomen_ct_1p5mm_lps.nii.gz"
    out = uh.predict_volume(m, path, 64, 1, out_path=tmp_path / "pred.nii.gz")
    src = nib.load(str(path))
    saved = nib.load(str(tmp_path / "pred.nii.gz"))
    assert out.shape == src.shape and np.allclose(saved.affine, src.affine)
    assert nib.aff2axcodes(saved.affine) == ("L", "P", "S")


def test_recipes_one_word_apart():
    b, d = uh.recipe("baseline"), uh.recipe("default")
    assert set(b) == set(d) and b["context"] == 1 and not b["postprocess"] and b["tumor_share"] == 0
    with pytest.raises(ValueError, match="RECIPE must be one of"):
        uh.recipe("fancy")


# ---------------------------------------------------------------- two-stage cascade
def test_liver_box_margin_square_and_border():
    m = np.zeros((100, 80, 30), bool)
    m[40:60, 30:40, 10:20] = True
    box = uh.liver_box(m, (1.0, 1.0, 2.0), margin_mm=4)
    x0, x1, y0, y1, z0, z1 = box
    assert (x0, x1) == (36, 64) and (z0, z1) == (8, 22)
    assert x1 - x0 == y1 - y0 and y0 <= 26 and y1 >= 44  # square in mm, still covers the mask + margin
    assert uh.crop_box(m, box).sum() == m.sum()
    edge = np.zeros((50, 50, 5), bool)
    edge[0:5, 10:40, :] = True
    b = uh.liver_box(edge, (1, 1, 1), 3)
    assert b[0] == 0 and b[1] - b[0] == b[3] - b[2] and b[1] <= 50
    assert uh.liver_box(np.zeros((4, 4, 4), bool), (1, 1, 1)) is None


def test_roi_cache_and_stage2_view(synthetic_dir, tmp_path):
    cases = uh.find_cases(synthetic_dir)[:2]
    plain = uh.preprocess_dataset(cases, tmp_path, 32, workers=0, progress=False)
    roi = uh.preprocess_dataset(cases, tmp_path, 32, workers=0, progress=False, roi_size=48, roi_margin_mm=10)
    assert plain[0].roi_image is None and not any(c.from_cache for c in roi)  # a new key
    c = roi[0]
    x0, x1, y0, y1, z0, z1 = c.meta["roi_box"]
    full = np.asarray(c.label_full)
    assert full[x0:x1, y0:y1, z0:z1].astype(bool).sum() == full.astype(bool).sum()  # the box holds the liver
    assert c.roi_image.shape == (z1 - z0, 48, 48) and c.roi_label.shape == (z1 - z0, 48, 48)
    view = uh.roi_cases(roi)
    assert view[0].n_slices == z1 - z0 and view[0].has_liver.sum() >= 1
    with pytest.raises(ValueError, match="roi_size"):
        uh.roi_cases(plain)


def test_train_stage2_trains_the_liver_boxes_with_the_recipes_stage2_settings(synthetic_dir, tmp_path):
    """Stage 2 trains on the liver boxes (48² here), on 16² windows with (48 / 16)² = 9 times the whole boxes'
    steps per epoch, mirrored as the recipe says; the checkpoint EVAL_CHECKPOINT names is the one loaded."""
    cases = uh.preprocess_dataset(uh.find_cases(synthetic_dir)[:3], tmp_path / "cache", 32, workers=0,
                                  progress=False, roi_size=48)
    rec = uh.recipe("default")
    s = {"RECIPE_SETTINGS": rec, "GPUS": 1, "CONTEXT_SLICES": 3, "SEED": 0, "DETERMINISTIC": True, "BASE_CHANNELS": 4,
         "DEPTH": 2, "STEPS_PER_EPOCH": 2, "BATCH_SIZE": 4, "ROI_SIZE": 48, "PATCH_SIZE": 16, "LR": 1e-3,
         "RESUME": False, "EVAL_CHECKPOINT": "best", "CASCADE_CORE_MM": 2.0}
    stage2, history, epoch = uh.train_stage2(cases[:2], cases[2:], s, 3, tmp_path / "run", {"RECIPE": "x"},
                                             torch.device("cpu"))
    assert len(history) == 3 and stage2.roi_size == 48 and stage2.mirror and stage2.average_liver
    last = uh.load_checkpoint(tmp_path / "run" / "stage2" / "last.pt")
    assert last["run"] == {"RECIPE": "x", "stage": 2}
    assert last["train_config"]["steps_per_epoch"] == 2 * 9 and last["train_config"]["sampling"]["window"] == 16
    assert last["train_config"]["augment"]["mirror"] == 0.5  # stage 2 of the default: mirrored windows
    best = uh.load_checkpoint(tmp_path / "run" / "stage2" / "best.pt")
    assert epoch == best["epoch"] + 1  # the checkpoint EVAL_CHECKPOINT names, counted from 1
    for name, w in stage2.model.state_dict().items():
        assert torch.equal(w, best["model"][name]), name
    if best["epoch"] != last["epoch"]:  # and not the last epoch's weights
        assert any(not torch.equal(w, last["model"][k]) for k, w in stage2.model.state_dict().items())
    data, index, _, _ = uh.make_slice_sets(uh.roi_cases(cases[:2]), uh.roi_cases(cases[2:]), s, torch.device("cpu"))
    assert data.images.shape[1:] == (48, 48) and len(index) <= len(data)


def test_amp_settings_name_the_autocast_type():
    """True picks bf16 where the GPU has it natively (never here: no CUDA), else fp16; "fp16" and "bf16" force one;
    anything else is refused, on every device."""
    assert uh._amp_dtype(True) == torch.float16 and uh._amp_dtype("fp16") == torch.float16
    assert uh._amp_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="amp must be"):
        uh.make_train_state(uh.UNet(1, 3, 4, 2), uh.TrainConfig(amp="half"), 1, torch.device("cpu"))
    state = uh.make_train_state(uh.UNet(1, 3, 4, 2), uh.TrainConfig(amp="fp16"), 1, torch.device("cpu"))
    assert state.use_amp is False and not state.scaler.is_enabled()  # on a CPU: plain fp32, no scaler


def test_liver_crop_holds_true_and_predicted_foreground_by_hand():
    truth, pred = np.zeros((40, 30), np.uint8), np.zeros((40, 30), np.uint8)
    truth[10:20, 5:15] = 1
    pred[30, 25] = 2  # a false call far from the liver stays in the box
    assert uh._liver_crop(truth, pred, margin=2) == (8, 33, 3, 28)  # x 10..30 +-2, y 5..25 +-2 (ends exclusive)
    assert uh._liver_crop(truth, np.zeros_like(pred), margin=50) == (0, 40, 0, 30)  # clipped to the slice
    assert uh._liver_crop(np.zeros_like(truth), np.zeros_like(pred)) == (0, 40, 0, 30)  # nothing: whole slice


def test_per_case_figure_sorted_by_tumour_dice_tumour_free_last(tmp_path):
    import matplotlib
    matplotlib.use("Agg")

    def row(case, tumour, fp_ml=0.0):
        return {"case": case, "has_tumor": tumour is not None, "dice_tumor": float("nan") if tumour is None else tumour,
                "dice_liver_lits": 0.9, "fp_tumor_ml": fp_ml}

    rows = [row("a", 0.7), row("b", None, 1.4), row("c", 0.2), row("d", 0.5)]
    ax = uh.plot_per_case(rows, tmp_path).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["c", "d", "a", "b"]  # 0.2 < 0.5 < 0.7, then none
    texts = [t.get_text() for t in ax.texts]
    assert "0.20" in texts and "no tumour; 1.4 mL called" in texts


def test_figures_order_slices_by_tumour_then_liver_by_hand():
    labels = np.zeros((40, 40, 4), np.uint8)
    labels[:, :, 0] = 1  # 1,600 liver voxels, no tumour
    labels[:5, :5, 1], labels[0, :3, 1] = 1, 2  # 3 tumour voxels, 25 of liver or tumour
    labels[:10, :10, 2], labels[0, :3, 2] = 1, 2  # 3 tumour voxels, 100 of liver or tumour: first
    labels[0, :2, 3] = 2  # 2 tumour voxels
    assert uh._slices_by_tumor(labels).tolist() == [2, 1, 3, 0]  # a slice's liver never outweighs a tumour voxel


def test_montage_shows_the_slices_with_the_most_tumour_in_order(tmp_path):
    """Tumour voxels per slice 0, 5, 1, 9, 3, 0, 7 (z = 0..6): the 3 with the most are z = 3, 6, 1, shown in slice
    order; the prediction matches z = 1 exactly and misses z = 3 and 6."""
    import matplotlib
    matplotlib.use("Agg")
    truth = np.zeros((10, 10, 7), np.uint8)
    truth[1:9, 1:9] = 1
    for z, n in enumerate((0, 5, 1, 9, 3, 0, 7)):
        truth[2, 1:1 + n, z] = 2
    pred = truth.copy()
    pred[pred == 2] = 1
    pred[:, :, 1] = truth[:, :, 1]

    class Case:
        case_id, label_full, image = "c", truth, np.zeros((7, 10, 10), np.float16)

    fig = uh.plot_montage(Case(), pred, n=3, output_dir=tmp_path)
    assert [ax.get_title() for ax in fig.axes[:3]] == ["z=1: tumour Dice 1.00", "z=3: tumour Dice 0.00",
                                                       "z=6: tumour Dice 0.00"]


class _Threshold(torch.nn.Module):
    """A stand-in stage-2 model: liver where the centre channel is bright."""

    def forward(self, x):
        c = x[:, x.shape[1] // 2: x.shape[1] // 2 + 1]
        return torch.cat([0.5 - c, c - 0.5, torch.full_like(c, -10.0)], 1) * 20


def test_predict_cascade_pastes_at_full_resolution():
    full = np.zeros((120, 120, 10), np.float32)
    full[30:71, 50:93, 2:8] = 1.0  # the "liver" at full resolution
    coarse = np.zeros((120, 120, 10), np.uint8)
    coarse[28:72, 48:96, 2:8] = 1  # a blocky stage-1 prediction
    out = uh.predict_cascade(coarse, full, (1.0, 1.0, 1.0), uh.Stage2(_Threshold(), roi_size=64, margin_mm=5),
                             context=1, device="cpu")
    assert uh.dice(out == 1, full > 0.5) > 0.97
    assert uh.dice(coarse == 1, full > 0.5) < uh.dice(out == 1, full > 0.5)
    assert out[:20].sum() == 0  # background outside the box
    empty = np.zeros_like(coarse)
    assert uh.predict_cascade(empty, full, (1, 1, 1), uh.Stage2(_Threshold(), 64), 1, "cpu").sum() == 0


class _TumourOnTheLeft(torch.nn.Module):
    """A stand-in stage 2 that ignores its input: tumour (logit 50) in the left half of every box (columns
    < W/2), the three classes equal elsewhere."""

    def forward(self, x):
        out = torch.zeros(x.shape[0], 3, *x.shape[-2:])
        out[:, 2, :, : x.shape[-1] // 2] = 50.0
        return out


def test_mirror_average_by_hand():
    """Over the box and its mirrors, every pixel sees the tumour half in two of four views: softmax tumour
    (1 + 1/3 + 1 + 1/3) / 4 = 2/3, background and liver (0 + 1/3 + 0 + 1/3) / 4 = 1/6 each (e^-50 ignored)."""
    x = torch.rand(2, 3, 6, 8)
    out = uh.MirrorAverage(_TumourOnTheLeft())(x)
    expected = torch.log(torch.tensor([1 / 6, 1 / 6, 2 / 3]))[None, :, None, None].expand(2, 3, 6, 8)
    assert torch.allclose(out, expected, atol=1e-6)
    pointwise = torch.nn.Conv2d(3, 3, 1)  # mirror-equivariant: the average is its own softmax
    assert torch.allclose(uh.MirrorAverage(pointwise)(x), torch.log_softmax(pointwise(x), 1), atol=1e-5)


def test_stage2_mirror_reaches_the_cascade():
    """``Stage2(mirror=True)`` labels the boxes with the mirror average: tumour in the whole box (2/3 > 1/6),
    not only in its left half; without it, only there."""
    full = np.zeros((60, 60, 6), np.float32)
    coarse = np.zeros((60, 60, 6), np.uint8)
    coarse[20:40, 20:40, 1:5] = 1
    plain = uh.predict_cascade(coarse, full, (1.0, 1.0, 1.0), uh.Stage2(_TumourOnTheLeft(), 32, 0.0, None), 1, "cpu")
    mirrored = uh.predict_cascade(coarse, full, (1.0, 1.0, 1.0),
                                  uh.Stage2(_TumourOnTheLeft(), 32, 0.0, None, mirror=True), 1, "cpu")
    box = (slice(20, 40), slice(20, 40), slice(1, 5))  # the liver box; roi 32 grows it to 32 pixels in-plane
    assert (mirrored[box] == 2).all() and 0 < (plain[box] == 2).mean() < 1
    assert (mirrored == 2).sum() == 32 * 32 * 4 and (plain == 2).sum() == 16 * 32 * 4


class _LabelFromIntensity(torch.nn.Module):
    """A perfect stand-in stage 2 for images that encode their label as intensity (label / 2)."""

    def forward(self, x):
        lab = torch.round(x[:, x.shape[1] // 2] * 2).long().clamp(0, 2)
        return torch.nn.functional.one_hot(lab, 3).permute(0, 3, 1, 2).float() * 20


def test_cascade_crop_paste_round_trip_is_exact():
    truth = np.zeros((96, 80, 12), np.uint8)
    truth[30:62, 20:50, 3:9] = 1
    truth[40:46, 30:37, 4:7] = 2  # a small lesion inside the liver
    truth[52, 44, 5] = 2  # and a one-voxel one
    image = truth / 2.0  # the stand-in stage 2 reads the label back from the intensity
    stage1 = truth.copy()
    stage1[stage1 == 2] = 1  # stage 1 only finds the liver
    for roi in (48, 64):  # the box (32 + 2 * 5 voxels of margin = 42) fits the window: native, no resize
        box, crop = uh.cascade_input(stage1, image, (1.0, 1.0, 2.0), uh.Stage2(_LabelFromIntensity(), roi, 5.0))
        x0, x1, y0, y1, z0, z1 = box
        assert (x1 - x0, y1 - y0) == (roi, roi) and crop.shape == (z1 - z0, roi, roi)
        out = uh.predict_cascade(stage1, image, (1.0, 1.0, 2.0), uh.Stage2(_LabelFromIntensity(), roi, 5.0), 1, "cpu")
        np.testing.assert_array_equal(out, truth)  # pasted back voxel for voxel: Dice 1 for liver and tumour
    small = uh.predict_cascade(stage1, image, (1.0, 1.0, 2.0), uh.Stage2(_LabelFromIntensity(), 24, 5.0), 1, "cpu")
    assert uh.dice(small == 1, truth == 1) > 0.9  # a box larger than the window is resized: close, not exact
    assert not np.array_equal(small, truth)


def test_liver_core_by_hand():
    liver = np.zeros((11, 11, 3), bool)
    liver[2:9, 2:9, :] = True  # a 7 x 7 square in each slice: its rings lie 1, 2, 3, 4 pixels inside
    core = uh.liver_core(liver, (1.0, 1.0, 5.0), 2.0)
    expected = np.zeros_like(liver)
    expected[4:7, 4:7, :] = True  # more than 2 mm inside: the 3 x 3 centre (rings 3 and 4), slice thickness aside
    np.testing.assert_array_equal(core, expected)
    assert not uh.liver_core(liver, (0.5, 0.5, 5.0), 2.0).any()  # at 0.5 mm the centre is 2.0 mm deep, not more
    expected = np.zeros_like(liver)
    expected[4:7, 3:8, :] = True  # 1 x 2 mm pixels: depth min(x - 1, 9 - x, 2 (y - 1), 2 (9 - y)) > 2 mm
    np.testing.assert_array_equal(uh.liver_core(liver, (1.0, 2.0, 5.0), 2.0), expected)
    assert uh.liver_core(liver, (1.0, 1.0, 5.0), 0.0).sum() == 7 * 7 * 3  # depth 0: the whole mask
    assert not uh.liver_core(liver, (1.0, 1.0, 5.0), None).any()
    edge = np.zeros((11, 11, 1), bool)
    edge[0:7, 2:9, 0] = True  # the same square against the image border at x = 0: the border is outside
    expected = np.zeros_like(edge)
    expected[2:5, 4:7, 0] = True  # rows 0-1 are 1-2 pixels from the border, row 5-6 from the liver's far edge
    np.testing.assert_array_equal(uh.liver_core(edge, (1.0, 1.0, 5.0), 2.0), expected)
    with pytest.raises(ValueError, match="X, Y, Z"):
        uh.liver_core(edge[:, :, 0], (1.0, 1.0), 2.0)


class _Background(torch.nn.Module):
    """A stand-in stage 2 that sees no liver anywhere (as a stage 2 can on CT unlike its training data), and
    tumour where the centre channel is bright."""

    def forward(self, x):
        c = x[:, x.shape[1] // 2: x.shape[1] // 2 + 1]
        return torch.cat([torch.full_like(c, 0.5), torch.zeros_like(c), c], 1) * 20


def test_predict_cascade_keeps_the_interior_of_stage1_liver():
    stage1 = np.zeros((60, 60, 4), np.uint8)
    stage1[20:27, 20:27, :] = 1  # a 7 x 7 liver in 4 slices
    stage1[23, 23, 1] = 2  # stage 1's tumour call: stage 2 decides tumour, so it becomes liver
    image = np.zeros(stage1.shape, np.float32)
    image[23, 24, 2] = 1.0  # stage 2 calls tumour here, inside the core
    out = uh.predict_cascade(stage1, image, (1.0, 1.0, 3.0), uh.Stage2(_Background(), 32, 5.0), 1, "cpu")
    expected = np.zeros_like(stage1)
    expected[22:25, 22:25, :] = 1  # stage 2 erased the liver; the 3 x 3 centre more than 2 mm inside stays liver
    expected[23, 24, 2] = 2  # and stage 2's tumour call stands
    np.testing.assert_array_equal(out, expected)
    off = uh.predict_cascade(stage1, image, (1.0, 1.0, 3.0), uh.Stage2(_Background(), 32, 5.0, core_mm=None), 1, "cpu")
    assert off.sum() == 2 and off[23, 24, 2] == 2  # without the rule stage 2's call stands everywhere


def test_liver_box_grows_to_the_stage2_window():
    m = np.zeros((100, 80, 30), bool)
    m[40:60, 30:40, 10:20] = True
    x0, x1, y0, y1, z0, z1 = uh.liver_box(m, (1.0, 1.0, 2.0), margin_mm=4, min_side=40)
    assert (x0, x1, y0, y1) == (30, 70, 15, 55) and (z0, z1) == (8, 22)  # 28 -> 40 around the centre (50, 35)
    edge = uh.liver_box(m, (1.0, 1.0, 2.0), margin_mm=4, min_side=90)
    assert (edge[2], edge[3]) == (0, 80) and edge[1] - edge[0] == 90  # clamped to the image's 80 in y
    assert uh.roi_size_for((192, 192)) == 128 and uh.roi_size_for((256, 256)) == 160
    assert uh.roi_size_for((512, 512)) == 320 and uh.roi_size_for((100, 90)) == 64
    assert uh.cascade_epochs(20) == (7, 13) and uh.cascade_epochs(2) == (1, 1) and uh.cascade_epochs(1) == (1, 1)
    assert uh.cascade_epochs(20, 0.2) == (4, 16) and uh.cascade_epochs(8, 0.2) == (2, 6)  # 1.6 rounds to 2
    for bad in (0, 1, 1.5):
        with pytest.raises(ValueError, match="stage1_share"):
            uh.cascade_epochs(20, bad)


def test_cascade_plan_gives_stage_one_enough_steps_or_trains_one_stage():
    """Stage 1's share, raised to a floor of optimizer steps, or one stage when the floor would take over half."""
    plan = uh.cascade_plan
    assert plan(20, 0.2, 40, 120)[:2] == (4, 16)  # 4 x 40 = 160 steps >= 120: the share as it is
    first, second, why = plan(20, 0.2, 20, 120)  # 4 x 20 = 80 < 120: ceil(120 / 20) = 6 epochs, 6 <= 10
    assert (first, second) == (6, 14) and "more than its share of 4" in why
    assert plan(12, 0.2, 20, 120)[:2] == (6, 6)  # the floor is exactly half the budget: still two stages
    first, second, why = plan(10, 0.2, 14, 120)  # the notebook on the real slices: ceil(120 / 14) = 9 > 5
    assert (first, second) == (10, 0) and why.startswith("CASCADE off")
    assert plan(10, 0.2, 14, 120, forced=True)[:2] == (2, 8)  # CASCADE = True: the split is kept, with a warning
    assert "only 28 steps" in plan(10, 0.2, 14, 120, forced=True)[2]
    assert plan(10, 0.2, 14, 0)[:2] == (2, 8)  # no floor: the share alone (cascade_epochs)
    # the default floor, 240 steps (where real-CT liver Dice stops rising steeply; BENCHMARKS §6): the notebook's
    # demo (20 epochs of 31 steps) keeps its cascade with ceil(240 / 31) = 8 epochs for stage 1; the real slices at
    # the notebook's 10 epochs of 14 steps train one stage
    assert plan(20, 0.2, 31)[:2] == (8, 12) and plan(10, 0.2, 14)[:2] == (10, 0)


def test_cascade_in_evaluate_and_predict_volume(tiny_data, synthetic_dir, tmp_path, monkeypatch):
    m, _ = _run(tiny_data, tmp_path / "s1", epochs=1)
    s2 = uh.Stage2(uh.UNet(3, 3, base_channels=4, depth=2), roi_size=32, margin_mm=10)
    floors = []  # the tumour floor each post-processing received, with the voxel size
    drop = uh.drop_small_tumor
    monkeypatch.setattr(uh, "drop_small_tumor", lambda p, sp, ml: floors.append((ml, tuple(sp))) or drop(p, sp, ml))
    ev = uh.evaluate(m, tiny_data["val_cases"], 3, "cpu", progress=False, stage2=s2, min_tumor_ml=0.1)
    assert len(ev["per_case"]) == 2 and "dice_liver" in ev["summary"]
    assert floors == [(0.1, tuple(c.meta["spacing"])) for c in tiny_data["val_cases"]]
    out = uh.predict_volume(m, synthetic_dir / "images" / "liver_4.nii.gz", 32, 3, stage2=s2, min_tumor_ml=0.1)
    assert len(floors) == 3 and floors[-1][0] == 0.1
    assert out.shape == nib.load(str(synthetic_dir / "images" / "liver_4.nii.gz")).shape
    uh.plot_cascade(tiny_data["val_cases"][0], m, s2, 3, "cpu", tmp_path)
    assert (tmp_path / "cascade.png").stat().st_size > 10_000


def test_validation_2d_tumour_dice_needs_true_tumour():
    """One false-positive tumour pixel on tumour-free slices leaves tumour and mean Dice undefined (not 0)."""
    class Fixed(torch.nn.Module):  # predicts label y_hat everywhere, whatever the input
        def __init__(self, y_hat):
            super().__init__()
            self.y_hat, self.w = y_hat, torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return torch.nn.functional.one_hot(self.y_hat, 3).permute(0, 3, 1, 2).float() * 10 + self.w

    class Slices:  # the one method validate_slices uses
        def __init__(self, y):
            self.y = y

        def batch(self, idx, device):
            return torch.zeros(len(idx), 1, 4, 4), self.y[torch.as_tensor(idx)]

    y = torch.zeros(2, 4, 4, dtype=torch.long)
    y[:, :2] = 1  # liver in the top half of both slices, no tumour
    y_hat = y.clone()
    y_hat[0, 0, 0] = 2  # one false-positive tumour pixel, taken from the liver
    r = uh.validate_slices(Fixed(y_hat), Slices(y), np.arange(2), uh.make_loss(), torch.device("cpu"), amp=False)
    assert r["val_dice_liver_2d"] == pytest.approx(2 * 15 / (15 + 16))  # 15 of 16 liver pixels found
    assert math.isnan(r["val_dice_tumor_2d"]) and math.isnan(r["val_dice_mean_2d"])
    y[1, 3, 3] = 2  # now one true tumour pixel, missed: tumour Dice 0, mean (liver + 0) / 2
    r = uh.validate_slices(Fixed(y_hat), Slices(y), np.arange(2), uh.make_loss(), torch.device("cpu"), amp=False)
    assert r["val_dice_tumor_2d"] == 0.0
    assert r["val_dice_mean_2d"] == pytest.approx(r["val_dice_liver_2d"] / 2)


def test_best_checkpoint_score_falls_back():
    assert uh._selection_score({"val_dice_mean_2d": 0.6, "val_dice_liver_2d": 0.9, "train_dice_loss": 0.3}) == 0.6
    nan = float("nan")  # no true tumour in the validation slices: liver Dice decides
    assert uh._selection_score({"val_dice_mean_2d": nan, "val_dice_liver_2d": 0.9, "train_dice_loss": 0.3}) == 0.9
    assert uh._selection_score({"train_dice_loss": 0.3}) == -0.3  # no validation: lower training loss is better


def test_pooled_counts_and_raw_values_by_hand():
    truth = np.zeros((6, 1, 1), np.uint8)
    truth[:4, 0, 0] = [1, 1, 2, 2]
    raw = np.zeros_like(truth)
    raw[:, 0, 0] = [1, 2, 2, 0, 0, 1]  # voxel 5: a stray liver voxel, separate from the rest
    final = uh.postprocess(raw)  # drops voxel 5 only
    np.testing.assert_array_equal(final[:, 0, 0], [1, 2, 2, 0, 0, 0])
    row = uh._score_with_raw(raw, final, truth, (1.0, 1.0, 1.0))
    # final: liver tp 1 (voxel 0), fp 0, fn 1 (voxel 1); tumour tp 1 (2), fp 1 (1), fn 1 (3)
    # label >= 1: tp 3 (0, 1, 2), fp 0, fn 1 (3); raw adds the stray liver voxel as a false positive
    expected = {"liver": (1, 0, 1), "tumor": (1, 1, 1), "liver_lits": (3, 0, 1)}
    for key, (tp, fp, fn) in expected.items():
        assert (row[f"tp_{key}"], row[f"fp_{key}"], row[f"fn_{key}"]) == (tp, fp, fn), key
    assert (row["fp_liver_raw"], row["fp_liver_lits_raw"], row["fp_tumor_raw"]) == (1, 1, 1)
    assert row["dice_liver"] == pytest.approx(2 / 3) and row["dice_liver_raw"] == pytest.approx(2 / 4)
    assert row["dice_liver_lits_raw"] == pytest.approx(6 / 8) and row["dice_tumor_raw"] == pytest.approx(0.5)
    s = uh.summarize([row, row])  # global Dice from the counts summed over cases: 2 x (6 / (6 + 1))
    assert s["dice_liver_lits_global"] == pytest.approx(12 / 14)
    assert s["dice_liver_lits_global_raw"] == pytest.approx(12 / 16)


def test_predict_volume_feeds_the_network_what_training_saw(synthetic_dir, tmp_path, monkeypatch):
    for files in uh.find_cases(synthetic_dir)[:3]:  # RAS and LPS headers among them
        cached = uh.preprocess_dataset([files], tmp_path / "cache", 32, (-100, 400), workers=0, progress=False)[0]
        seen = {}
        real = uh.predict_slices

        def spy(model, slices, *args, _real=real, _seen=seen, **kwargs):
            _seen["slices"] = np.array(slices)
            return _real(model, slices, *args, **kwargs)

        monkeypatch.setattr(uh, "predict_slices", spy)
        uh.predict_volume(uh.UNet(1, 3, 4, 2), files.image, 32, 1, (-100, 400))
        monkeypatch.setattr(uh, "predict_slices", real)
        assert seen["slices"].dtype == np.float16
        np.testing.assert_array_equal(seen["slices"], np.asarray(cached.image))  # bit for bit the training input


def test_bf16_only_on_compute_capability_8(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, native in (((6, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, _c=capability: _c)
        assert uh._native_bf16() is native, capability  # P100, T4: fp16 + scaler; A100, H100: bf16
        assert uh.mixed_precision("cuda:0") == ("bf16" if native else "fp16 + GradScaler"), capability
    assert uh.mixed_precision("cpu") == "fp32" and uh.mixed_precision(torch.device("mps")) == "fp32"


def test_determinism_is_the_default_on_cpu_and_opt_in_on_cuda(monkeypatch):
    try:
        assert uh.set_determinism(0) is True and torch.are_deterministic_algorithms_enabled()
        assert uh.set_determinism(0, deterministic=False) is False
        assert not torch.are_deterministic_algorithms_enabled()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert uh.set_determinism(0) is False and torch.backends.cudnn.benchmark  # fast by default on CUDA
        assert uh.set_determinism(0, deterministic=True) is True and not torch.backends.cudnn.benchmark
    finally:
        monkeypatch.undo()
        torch.backends.cudnn.benchmark = False
        uh.set_determinism(0)


def test_available_ram_reads_the_kernels_estimate(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:          500000 kB\nMemAvailable:   9000000 kB\n")
    assert uh.available_ram(meminfo) == 9_000_000 * 1024  # free pages alone (500 MB) would understate it
    assert uh.available_ram(tmp_path / "missing") > 0  # elsewhere: free physical pages


def test_resume_across_precision_changes(tiny_data, tmp_path):
    """A run saved without a grad scaler (bf16 GPU, CPU) resumes where one is on (fp16 GPU)."""
    _run(tiny_data, tmp_path / "a", epochs=1)  # CPU: the saved scaler state is empty
    cfg = uh.TrainConfig(epochs=1, batch_size=8, lr=3e-3, steps_per_epoch=3, sampling=uh.Sampling(0.25), seed=0)
    state = uh.make_train_state(uh.UNet(3, 3, base_channels=4, depth=2), cfg, 3, torch.device("cpu"))
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch < 2.3 has no CPU GradScaler to stand in for a GPU's")
    state.scaler = torch.amp.GradScaler("cpu", enabled=True)  # stands in for a T4's fp16 scaler
    assert uh.resume_state(tmp_path / "a" / "last.pt", state, cfg)[0] == 1
    assert state.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()  # a fresh scale, not a failure


def test_adamw_fused_where_torch_has_it_and_same_update():
    """``uh.adamw`` is torch's AdamW (fused where the build has it for the device): 5 steps of it and of the
    plain per-parameter loop from the same weights and gradients end at the same weights."""
    torch.manual_seed(0)
    a, b = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(3, 4, 3)
    b.load_state_dict(a.state_dict())
    plain, ours = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=1e-4), uh.adamw(b.parameters(), 1e-2, 1e-4)
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4):  # fused AdamW on the CPU since 2.4
        assert ours.param_groups[0]["fused"] is True
    x = torch.randn(2, 3, 8, 8)
    for _ in range(5):
        for net, opt in ((a, plain), (b, ours)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


def test_adamw_falls_back_where_torch_has_no_fused_kernel(monkeypatch):
    """On a torch without a fused AdamW for the device (CPU before 2.4), ``uh.adamw`` is the plain AdamW."""
    real = torch.optim.AdamW

    def no_fused(params, **kw):
        if kw.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported "
                               "devices: ['cuda']")
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    opt = uh.adamw(torch.nn.Conv2d(1, 1, 3).parameters(), 1e-3, 1e-4)
    assert isinstance(opt, real) and not opt.param_groups[0]["fused"]


def test_resume_keeps_todays_optimizer_kernel(tiny_data, tmp_path):
    """A checkpoint whose AdamW ran another kernel (fused on a GPU; the loop on an older torch) resumes with the
    kernel chosen here, not the saving machine's (which this torch may not have)."""
    _run(tiny_data, tmp_path / "a", epochs=2)
    path = tmp_path / "a" / "last.pt"
    ck = uh.load_checkpoint(path)
    for g in ck["optimizer"]["param_groups"]:
        g["fused"], g["foreach"] = not g.get("fused"), True  # another machine's kernels
    torch.save(ck, path)
    cfg = uh.TrainConfig(epochs=2, batch_size=8, lr=3e-3, steps_per_epoch=3, sampling=uh.Sampling(0.25), seed=0)
    state = uh.make_train_state(uh.UNet(3, 3, base_channels=4, depth=2), cfg, 3, torch.device("cpu"))
    today = [(g["fused"], g["foreach"]) for g in state.opt.param_groups]
    assert uh.resume_state(path, state, cfg)[0] == 2
    assert [(g["fused"], g["foreach"]) for g in state.opt.param_groups] == today
    assert state.opt.state_dict()["state"]  # the moments were loaded
    x, y = tiny_data["train"].batch(tiny_data["ti"][:8])
    uh.train_step(state, x, y)  # and today's kernel steps on them


def _ddp_cfg(epochs=2):
    # no augmentation and per-slice Dice: the loss of a batch is then the mean of its halves' losses, so two
    # processes with half a batch each must follow one process with the whole batch
    return uh.TrainConfig(epochs=epochs, batch_size=8, lr=3e-3, steps_per_epoch=3, sampling=uh.Sampling(0.25),
                          seed=0, augment=None, loss="dice_ce_per_slice")


def test_ddp_two_processes_follow_one_process(tiny_data, tmp_path):
    """DistributedDataParallel on the CPU (gloo, 2 spawned processes) vs one process: same loss curve.

    Tolerance 1e-4 relative on the per-epoch losses and 1e-3 absolute on the weights (a shared-weights bug,
    each process stepping the same memory, moves them by 2 x lr = 6e-3 a step): the only difference is the
    order of float sums (two half-batch gradients averaged vs one whole batch). Instance norm, because
    batch norm's statistics are per process by design (as with DataParallel).
    """
    torch.manual_seed(0)
    one = uh.UNet(3, 3, base_channels=4, depth=2, norm="instance")
    two, init = copy.deepcopy(one), copy.deepcopy(one)
    h1 = uh.train(one, tiny_data["train"], tiny_data["ti"], _ddp_cfg(), tmp_path / "one", tiny_data["val"],
                  tiny_data["vi"], progress=False)
    h2 = uh.train(two, tiny_data["train"], tiny_data["ti"], _ddp_cfg(), tmp_path / "two", tiny_data["val"],
                  tiny_data["vi"], progress=False, replicas=2)
    assert [r["processes"] for r in h1] == [1, 1] and [r["processes"] for r in h2] == [2, 2]
    for key in ("train_ce", "train_dice_loss", "val_ce"):
        np.testing.assert_allclose([r[key] for r in h2], [r[key] for r in h1], rtol=1e-4, err_msg=key)
    # the hard 2D Dice may flip a few pixels' argmax (Adam turns float noise in near-zero gradients into +-lr)
    np.testing.assert_allclose([r["val_dice_liver_2d"] for r in h2], [r["val_dice_liver_2d"] for r in h1], atol=2e-3)
    for (name, p1), p2 in zip(one.state_dict().items(), two.state_dict().values()):
        np.testing.assert_allclose(p2.numpy(), p1.numpy(), atol=1e-3, err_msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(two.state_dict().values(), init.state_dict().values()))


def test_ddp_checkpoint_resumes_in_one_process(tiny_data, tmp_path):
    """A multi-GPU run's last.pt has plain parameter names and loads into a one-GPU run (a Kaggle session ends)."""
    torch.manual_seed(0)
    trained = uh.UNet(3, 3, base_channels=4, depth=2)
    uh.train(trained, tiny_data["train"], tiny_data["ti"], _ddp_cfg(2), tmp_path, progress=False, replicas=2)
    ck = uh.load_checkpoint(tmp_path / "last.pt")
    assert not any(k.startswith("module.") for k in ck["model"])
    state = uh.make_train_state(uh.UNet(3, 3, base_channels=4, depth=2), _ddp_cfg(2), 3, torch.device("cpu"))
    next_epoch, history, _ = uh.resume_state(tmp_path / "last.pt", state, _ddp_cfg(2))
    assert next_epoch == 2 and [r["processes"] for r in history] == [2, 2]
    for a, b in zip(state.model.state_dict().values(), trained.state_dict().values()):
        assert torch.equal(a, b)  # and train_replicated left the trained weights in the caller's model


def test_distributed_batches_are_split_without_overlap():
    batches = [np.arange(8) + 10 * i for i in range(3)]
    a, b = uh.shard_batches(batches, 0, 2), uh.shard_batches(batches, 1, 2)
    for whole, x, y in zip(batches, a, b):
        assert len(x) == len(y) == 4 and sorted(np.concatenate([x, y]).tolist()) == whole.tolist()
    assert uh.shard_batches(batches, 0, 1) is batches
    with pytest.raises(ValueError, match="multiple of 3"):
        uh._ddp_wrap(uh.UNet(1, 3, 4, 1), torch.device("cpu"), 8, 3)


def test_multi_gpu_setting_resolves_and_refuses_what_cannot_run():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    n, note = uh.resolve_gpus(None, cuda, 32, visible=2)  # Kaggle's 2 x T4: one by default, and says how to use 2
    assert n == 1 and "GPUS = 2" in note
    assert uh.resolve_gpus(2, cuda, 32, visible=2)[0] == 2
    assert uh.resolve_gpus(1, cuda, 32, visible=2)[0] == 1
    assert uh.resolve_gpus(None, cuda, 15, visible=2)[0] == 1
    assert uh.resolve_gpus(None, cpu, 16)[0] == 1 and uh.resolve_gpus(None, cuda, 15, visible=1)[0] == 1
    for gpus, device, batch, visible, msg in [(3, cuda, 32, 2, "2 CUDA GPU"), (2, cuda, 15, 2, "multiple of 2"),
                                              (2, cpu, 16, 0, "needs CUDA"), (0, cuda, 16, 1, "1 CUDA GPU")]:
        with pytest.raises(ValueError, match=msg):
            uh.resolve_gpus(gpus, device, batch, visible=visible)


def test_failed_multi_process_run_leaves_the_model_ready_on_its_device(tiny_data, tmp_path):
    """A worker that raises: its error and traceback reach the caller, and the caller's model is back where it
    trains (device and channels_last memory format), as after a successful run, so the next cell can use it."""
    model = uh.UNet(3, 3, base_channels=4, depth=2)
    assert not model.inc[0].weight.is_contiguous(memory_format=torch.channels_last)
    bad = replace(_ddp_cfg(1), loss="no_such_loss")
    with pytest.raises(Exception, match="no_such_loss") as err:
        uh.train(model, tiny_data["train"], tiny_data["ti"], bad, tmp_path, progress=False, replicas=2)
    assert "Traceback" in str(err.value)  # the worker's own traceback
    assert model.inc[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model.inc[0].weight.device.type == "cpu"


def test_worker_timeout_names_the_likely_cause():
    hung = RuntimeError("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(...) ran for 600000 ms")
    out = uh._worker_failure(hung)
    assert isinstance(out, RuntimeError) and "out of host memory" in str(out) and "Watchdog" in str(out)
    killed = RuntimeError("process 1 terminated with signal SIGKILL")
    assert "out-of-memory killer" in str(uh._worker_failure(killed))
    other = ValueError("LOSS must be one of ...")
    assert uh._worker_failure(other) is other
    # a traceback whose source lines mention a timeout, ending in another error, is that error
    setup = RuntimeError("Traceback ...\n  init_process_group(backend, timeout=DDP_TIMEOUT)\n"
                         "RuntimeError: The server socket has failed to listen: address already in use")
    assert uh._worker_failure(setup) is setup
    assert uh.DDP_TIMEOUT.total_seconds() <= 30 * 60  # not torch's 30-minute default, nor the old hour


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_worker_ends_when_its_parent_is_killed(tmp_path):
    """A process that called uh._end_with_parent ends soon after its parent dies of SIGKILL (the OOM killer)."""
    child_code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import unet_helpers as uh; "
                  "uh._end_with_parent(int(sys.argv[2]), poll_s=0.2); open(sys.argv[3], 'w').write('ready'); "
                  "time.sleep(120)")
    ready = tmp_path / "ready"
    parent_code = ("import os, subprocess, sys, time; "
                   f"p = subprocess.Popen([sys.executable, '-c', {child_code!r}, {str(ROOT)!r}, str(os.getpid()), "
                   f"{str(ready)!r}]); print(p.pid, flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    deadline = time.time() + 300  # importing torch on a loaded machine is slow; that is not what is tested
    while not ready.exists() and time.time() < deadline:  # the child has imported torch and armed itself
        time.sleep(0.2)
    assert ready.exists()
    parent.kill()
    parent.wait()
    def running() -> bool:  # alive and not a zombie (exited, waiting to be reaped)
        try:
            return Path(f"/proc/{child_pid}/stat").read_text().split()[2] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + 15
    while running() and time.time() < deadline:
        time.sleep(0.2)
    alive = running()
    if alive:
        os.kill(child_pid, 9)
    assert not alive, "the worker outlived its parent"


def test_arch_check_stops_a_gpu_this_torch_cannot_run(monkeypatch, capsys):
    """A P100 (capability 6.0) with a torch built for sm_75 and newer: 'auto' falls back to the CPU and says why;
    asking for CUDA explicitly stops with what to choose instead. A T4 (7.5) and an H100 (9.0) run; so does an
    8.9 GPU on an sm_86 build (same major version) and any GPU newer than PTX the build carries."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla P100-PCIE-16GB")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_86", "sm_90"])
    for cap, runs in (((6, 0), False), ((7, 5), True), ((8, 9), True), ((9, 0), True), ((7, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_, c=cap: c)
        assert (uh.cuda_unsupported_reason() == "") == runs, cap
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (6, 0))
    reason = uh.cuda_unsupported_reason()
    assert "P100" in reason and "6.0" in reason and "T4" in reason and "sm_75" in reason
    with pytest.warns(UserWarning, match="falls back to the CPU"):
        assert uh.pick_device("auto").type in ("cpu", "mps")
    assert "falls back to the CPU" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="T4"):
        uh.pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "compute_50"])  # PTX: the driver compiles it
    assert uh.cuda_unsupported_reason() == ""


def test_data_placement_counts_memory_the_allocator_holds_free(monkeypatch):
    """Stage 2's sets after stage 1: torch's cache holds freed GPU memory that the driver reports as used."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *_: (1 * gib, 16 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *_: 10 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *_: 2 * gib)
    cuda = torch.device("cuda")
    # free to torch: 1 GiB from the driver + 8 GiB reserved but unused = 9 GiB; 40 % of it is 3.6 GiB
    assert uh.choose_data_device(int(3.5 * gib), cuda) == cuda
    assert uh.choose_data_device(int(3.7 * gib), cuda).type == "cpu"
    assert uh.choose_data_device(1, torch.device("cpu")).type == "cpu"


class _ConstantLogits(torch.nn.Module):
    """A stand-in network with the same logits (0, ln 3, 0) everywhere: softmax (1/5, 3/5, 1/5)."""

    def forward(self, x):
        out = torch.zeros(x.shape[0], 3, *x.shape[-2:])
        out[:, 1] = math.log(3.0)
        return out


def test_predict_slices_foreground_probability_by_hand():
    """Softmax (1/5, 3/5, 1/5): label 1 everywhere, foreground 1 - 1/5 = 0.8 on the output grid (float16)."""
    labels, fg = uh.predict_slices(_ConstantLogits(), np.zeros((5, 8, 8), np.float32), (12, 10), 1, "cpu",
                                   foreground=True)
    assert labels.shape == fg.shape == (12, 10, 5) and fg.dtype == np.float16
    assert (labels == 1).all()
    np.testing.assert_allclose(fg.astype(np.float32), 0.8, atol=1e-3)
    np.testing.assert_array_equal(uh.predict_slices(_ConstantLogits(), np.zeros((5, 8, 8), np.float32), (12, 10), 1,
                                                    "cpu"), labels)


def test_combine_stages_by_hand():
    """Foreground where (1 - p2_background + p1_foreground) / 2 ≥ 0.5; tumour where stage 2's p_tumour > p_liver.
    Pixels: stage 2 (bg, liver, tumour) and stage 1's foreground:
    a (0.6, 0.3, 0.1), 0.9 → (0.4 + 0.9) / 2 = 0.65 → liver (stage 1 keeps the liver stage 2 doubts);
    b (0.4, 0.5, 0.1), 0.1 → (0.6 + 0.1) / 2 = 0.35 → background (stage 1 outvotes stage 2);
    c (0.2, 0.3, 0.5), 0.5 → (0.8 + 0.5) / 2 = 0.65 → tumour; d (0.5, 0.2, 0.3), 0.5 → exactly 0.5 → tumour."""
    p2 = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.5, 0.1], [0.2, 0.3, 0.5], [0.5, 0.2, 0.3]]).T.reshape(1, 3, 2, 2)
    fg1 = torch.tensor([[0.9, 0.1], [0.5, 0.5]])[None]
    np.testing.assert_array_equal(uh.combine_stages(p2, fg1).numpy(), [[[1, 0], [2, 2]]])


def test_predict_cascade_averages_both_stages_liver():
    """Stage 2 (_ConstantLogits: liver 3/5, background 1/5) against stage 1's foreground, one slice per batch and
    the liver in slices 1-2 of 4: in slice 1 stage 1 says 0.1 (mean (0.8 + 0.1) / 2 = 0.45: background) left of
    column 15 and 0.3 (0.55: liver) right of it; in slice 2 it says 0.3 everywhere (liver in the whole box);
    outside the box background, as without averaging; without stage 1's probability it refuses."""
    stage1 = np.zeros((40, 40, 4), np.uint8)
    stage1[10:20, 10:20, 1:3] = 1
    fg = np.full(stage1.shape, 0.3, np.float16)
    fg[:, :15, 1] = 0.1
    stage2 = uh.Stage2(_ConstantLogits(), 16, 0.0, None, average_liver=True)
    out = uh.predict_cascade(stage1, np.zeros(stage1.shape, np.float32), (1.0, 1.0, 1.0), stage2, 1, "cpu",
                             batch_size=1, stage1_fg=fg)
    box = np.zeros(stage1.shape, bool)
    box[7:23, 7:23, 1:3] = True  # the 10-pixel liver grown to the 16-pixel window, centred; z 1-2
    expected = box.copy()
    expected[:, :15, 1] = False
    np.testing.assert_array_equal(out, expected.astype(np.uint8))
    plain = uh.predict_cascade(stage1, np.zeros(stage1.shape, np.float32), (1.0, 1.0, 1.0),
                               uh.Stage2(_ConstantLogits(), 16, 0.0, None), 1, "cpu")
    np.testing.assert_array_equal(plain, box.astype(np.uint8))  # stage 2 alone: liver in the whole box
    with pytest.raises(ValueError, match="stage1_fg"):
        uh.predict_cascade(stage1, np.zeros(stage1.shape, np.float32), (1.0, 1.0, 1.0), stage2, 1, "cpu")
    with pytest.raises(ValueError, match="shape"):
        uh.predict_cascade(stage1, np.zeros(stage1.shape, np.float32), (1.0, 1.0, 1.0), stage2, 1, "cpu",
                           stage1_fg=fg[:, :, :2])
