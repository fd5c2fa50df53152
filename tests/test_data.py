"""Data layer: finding cases, loading and validating NIfTI, preprocessing, cache, synthetic set."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_ct, write_nifti

import unet_helpers as uh


def _pair(root: Path, img_dir: str, lab_dir: str, names: list[str], ext=".nii"):
    img, lab = tiny_ct()
    for n in names:
        write_nifti(root / img_dir / f"{n}{ext}", img)
        if lab_dir:
            write_nifti(root / lab_dir / f"{n}{ext}", lab)


# ---------------------------------------------------------------- find_cases
def test_kaggle_layout_nested_natural_order(tmp_path):
    _pair(tmp_path / "input" / "Task03_Liver_rs", "images", "labels", ["liver_10", "liver_2", "liver_1"])
    cases = uh.find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["liver_1", "liver_2", "liver_10"]
    for c in cases:  # paired by id, not by position
        assert c.image.name == c.label.name == f"{c.case_id}.nii"
        assert c.image.parent.name == "images" and c.label.parent.name == "labels"


def test_msd_layout_with_unlabelled_test_images(tmp_path):
    _pair(tmp_path / "Task03_Liver", "imagesTr", "labelsTr", ["liver_0", "liver_1"], ext=".nii.gz")
    _pair(tmp_path / "Task03_Liver", "imagesTs", "", ["liver_132"], ext=".nii.gz")
    (tmp_path / "Task03_Liver" / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"junk")  # macOS metadata
    (tmp_path / "Task03_Liver" / ".hidden").mkdir()
    _pair(tmp_path / "Task03_Liver" / ".hidden", "imagesTr", "labelsTr", ["liver_7"])
    cases = uh.find_cases(tmp_path)
    assert [(c.case_id, c.label is not None) for c in cases] == [
        ("liver_0", True), ("liver_1", True), ("liver_132", False)]


@pytest.mark.parametrize("nested", [False, True])
def test_raw_lits_layout(tmp_path, nested):
    img, lab = tiny_ct()
    for n in (0, 11, 3):
        folder = tmp_path / (f"Training Batch {1 + n // 10}" if nested else "")
        write_nifti(folder / f"volume-{n}.nii", img)
        write_nifti(folder / f"segmentation-{n}.nii", lab)
    cases = uh.find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["lits_0", "lits_3", "lits_11"]
    assert all(c.label.name == f"segmentation-{c.case_id[5:]}.nii" for c in cases)


def test_label_without_image_is_an_error(tmp_path):
    _pair(tmp_path, "images", "labels", ["liver_0"])
    write_nifti(tmp_path / "labels" / "liver_5.nii", tiny_ct()[1])
    with pytest.raises(uh.CTDataError, match="liver_5.*no matching image"):
        uh.find_cases(tmp_path)


def test_two_candidates_for_one_case_is_an_error(tmp_path):
    _pair(tmp_path, "images", "labels", ["liver_0"])
    _pair(tmp_path, "images", "labels", ["liver_0"], ext=".nii.gz")
    with pytest.raises(uh.CTDataError, match="2 candidate image files"):
        uh.find_cases(tmp_path)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(uh.CTDataError, match="(?s)No CT cases found.*Kaggle.*Decathlon.*LiTS"):
        uh.find_cases(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        uh.find_cases(tmp_path / "nope")


# ---------------------------------------------------------------- load_case validation
def test_load_case_returns_float32_hu_and_uint8_label(tmp_path):
    img, lab = tiny_ct()
    aff = np.diag([0.8, 0.8, 2.5, 1.0])
    nimg = nib.Nifti1Image(img, aff)
    nimg.header.set_slope_inter(1.0, -1024.0)  # stored values + intercept = HU
    nib.save(nimg, str(tmp_path / "i.nii.gz"))
    write_nifti(tmp_path / "l.nii.gz", lab, aff)
    case = uh.load_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz")
    assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
    np.testing.assert_allclose(case.image, img.astype(np.float32) - 1024)
    assert case.spacing == pytest.approx((0.8, 0.8, 2.5))
    assert case.case_id == "i"


def test_shape_mismatch(tmp_path):
    img, lab = tiny_ct()
    write_nifti(tmp_path / "i.nii", img)
    write_nifti(tmp_path / "l.nii", lab[:, :, :4])
    with pytest.raises(uh.CTDataError, match=r"l.nii: label shape \(16, 16, 4\) differs"):
        uh.load_case(tmp_path / "i.nii", tmp_path / "l.nii")


def test_affine_mismatch(tmp_path):
    img, lab = tiny_ct()
    write_nifti(tmp_path / "i.nii", img, np.diag([1, 1, 2.5, 1.0]))
    write_nifti(tmp_path / "l.nii", lab, np.diag([1, 1, 5.0, 1.0]))
    with pytest.raises(uh.CTDataError, match="l.nii: label affine differs"):
        uh.load_case(tmp_path / "i.nii", tmp_path / "l.nii")


def test_label_values_255_named(tmp_path):
    img, lab = tiny_ct()
    write_nifti(tmp_path / "i.nii", img)
    write_nifti(tmp_path / "l.nii", (lab > 0).astype(np.uint8) * 255)
    with pytest.raises(uh.CTDataError, match=r"l.nii: .*found \[0, 255\].*mask > 0"):
        uh.load_case(tmp_path / "i.nii", tmp_path / "l.nii")


def test_float_labels_integral_accepted_fractional_rejected(tmp_path):
    img, lab = tiny_ct()
    write_nifti(tmp_path / "i.nii", img)
    write_nifti(tmp_path / "l.nii", lab.astype(np.float64))
    case = uh.load_case(tmp_path / "i.nii", tmp_path / "l.nii")
    np.testing.assert_array_equal(case.label, lab)
    write_nifti(tmp_path / "p.nii", lab.astype(np.float32) * 0.5)
    with pytest.raises(uh.CTDataError, match="p.nii: label is float with non-integral values"):
        uh.load_case(tmp_path / "i.nii", tmp_path / "p.nii")


def test_4d_singleton_squeezed_real_4d_rejected(tmp_path):
    img, lab = tiny_ct()
    write_nifti(tmp_path / "i4.nii", img[..., None])
    write_nifti(tmp_path / "l4.nii", lab[..., None])
    case = uh.load_case(tmp_path / "i4.nii", tmp_path / "l4.nii")
    assert case.image.shape == img.shape and case.label.shape == img.shape
    write_nifti(tmp_path / "series.nii", np.stack([img, img], -1))
    with pytest.raises(uh.CTDataError, match=r"series.nii: expected a 3D volume.*4D series"):
        uh.load_case(tmp_path / "series.nii")


def test_nan_rejected_and_non_hu_warned(tmp_path):
    img = tiny_ct()[0].astype(np.float32)
    img[3, 3, 3] = np.nan
    write_nifti(tmp_path / "nan.nii", img)
    with pytest.raises(uh.CTDataError, match="nan.nii: image holds NaN"):
        uh.load_case(tmp_path / "nan.nii")
    write_nifti(tmp_path / "mr.nii", np.random.default_rng(0).random((16, 16, 6)).astype(np.float32))
    with pytest.warns(UserWarning, match="mr.nii: intensities .* do not look like CT"):
        uh.load_case(tmp_path / "mr.nii")


def test_truncated_gz_and_text_file(tmp_path):
    img = tiny_ct((32, 32, 16))[0]
    good = write_nifti(tmp_path / "full.nii.gz", img)
    data = good.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(uh.CTDataError, match="cut.nii.gz: .*(truncated|cannot be read)"):
        uh.load_case(tmp_path / "cut.nii.gz")
    (tmp_path / "notes.nii").write_text("this is not an image\n" * 50)
    with pytest.raises(uh.CTDataError, match="notes.nii: cannot be read as NIfTI"):
        uh.load_case(tmp_path / "notes.nii")
    assert gzip.decompress(data)  # the intact file was fine


def test_lps_header_gives_same_canonical_arrays(tmp_path):
    img, lab = tiny_ct()
    aff = np.diag([0.7, 0.7, 2.0, 1.0])
    write_nifti(tmp_path / "ras.nii", img, aff)
    write_nifti(tmp_path / "ras_l.nii", lab, aff)
    lps_img, lps_aff = uh._to_lps(img, aff)
    lps_lab, _ = uh._to_lps(lab, aff)
    write_nifti(tmp_path / "lps.nii", lps_img, lps_aff)
    write_nifti(tmp_path / "lps_l.nii", lps_lab, lps_aff)
    a = uh.load_case(tmp_path / "ras.nii", tmp_path / "ras_l.nii")
    b = uh.load_case(tmp_path / "lps.nii", tmp_path / "lps_l.nii")
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
    np.testing.assert_array_equal(uh.from_canonical(b.label, b.source_affine), lps_lab)


# ---------------------------------------------------------------- real CT (../shared)
def test_real_ct_ras_vs_lps_copy(real_ct, tmp_path):
    src = nib.load(str(real_ct / "abdomen_ct_3mm_ras.nii.gz"))
    seg = nib.load(str(real_ct / "abdomen_ct_3mm_ras_liver.nii.gz"))
    a = uh.load_case(real_ct / "abdomen_ct_3mm_ras.nii.gz", real_ct / "abdomen_ct_3mm_ras_liver.nii.gz")
    img_lps, aff_lps = uh._to_lps(np.asanyarray(src.dataobj), src.affine)
    lab_lps, _ = uh._to_lps(np.asanyarray(seg.dataobj), src.affine)
    write_nifti(tmp_path / "ct_lps.nii.gz", img_lps, aff_lps)
    write_nifti(tmp_path / "ct_lps_liver.nii.gz", lab_lps, aff_lps)
    b = uh.load_case(tmp_path / "ct_lps.nii.gz", tmp_path / "ct_lps_liver.nii.gz")
    assert nib.aff2axcodes(b.source_affine) == ("L", "P", "S")
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    # float64 0/1 mask accepted; liver on the patient's right (+x in RAS)
    assert a.label.dtype == np.uint8 and set(np.unique(a.label)) == {0, 1}
    cx = np.argwhere(a.label == 1)[:, 0].mean()
    assert cx > a.image.shape[0] / 2 + 10
    assert (a.label == 1).any(axis=(0, 1)).sum() == 42


def test_real_ct_lps_file_lands_like_ras(real_ct):
    case = uh.load_case(real_ct / "chest_abdomen_ct_1p5mm_lps.nii.gz")
    assert nib.aff2axcodes(case.affine) == ("R", "A", "S")
    assert nib.aff2axcodes(case.source_affine) == ("L", "P", "S")
    assert case.spacing == pytest.approx((1.5, 1.5, 1.5))
    assert case.image.min() < -500 and case.image.max() > 300  # air and bone: HU kept


def test_real_ct_liver_hu_survives_windowing(real_ct):
    a = uh.load_case(real_ct / "abdomen_ct_3mm_ras.nii.gz", real_ct / "abdomen_ct_3mm_ras_liver.nii.gz")
    liver_hu = a.image[a.label == 1]
    assert 30 < liver_hu.mean() < 60  # README: mean ~ 44 HU
    w = uh.window_hu(a.image)
    assert w.min() == 0.0 and w.max() == 1.0
    assert w[a.label == 1].mean() == pytest.approx((liver_hu.clip(-100, 400).mean() + 100) / 500, abs=1e-4)
    air = a.image < -500
    assert (w[air] == 0).all()


# ---------------------------------------------------------------- preprocessing
def test_window_and_context_indices():
    x = np.array([-1000, -100, 150, 400, 3000], np.float32)
    np.testing.assert_allclose(uh.window_hu(x), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(uh.window_hu(x, (-200, 250)), [0, 100 / 450, 350 / 450, 1, 1])
    np.testing.assert_array_equal(uh.context_indices(4, 3), [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]])
    assert uh.context_indices(4, 5)[0].tolist() == [0, 0, 0, 1, 2]
    with pytest.raises(ValueError, match="odd"):
        uh.context_indices(4, 2)


def test_resize_label_is_nearest_and_image_smooth():
    lab = np.zeros((64, 64, 2), np.uint8)
    lab[10:30, 20:40] = 2
    out = uh.resize_volume_slices(lab, 32, is_label=True)
    assert out.shape == (2, 32, 32) and set(np.unique(out)) == {0, 2}
    assert out[0].sum() == 2 * 10 * 10
    img = np.zeros((64, 64, 1), np.float32)
    img[:30] = 1
    r = uh.resize_volume_slices(img, 16)
    assert r.shape == (1, 16, 16) and r.min() >= -1e-5 and r.max() <= 1 + 1e-5
    assert r[0, 7, 0] == pytest.approx(0.5)  # area averaging: the edge pixel is half covered
    assert uh.resize_volume_slices(img[:16, :16], 32).shape == (1, 32, 32)  # enlarging works too


def _hash_tree(root: Path) -> str:
    h = hashlib.sha1()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            st = p.stat()
            h.update(p.read_bytes() + str(st.st_mtime_ns).encode())
    return h.hexdigest()


def test_cache_reuse_invalidation_and_data_untouched(synthetic_dir, tmp_path, monkeypatch):
    before = _hash_tree(synthetic_dir)
    cases = uh.find_cases(synthetic_dir)
    cache = tmp_path / "cache"
    first = uh.preprocess_dataset(cases, cache, image_size=32, workers=0, progress=False, clean=False)
    assert not any(c.from_cache for c in first)
    assert first[0].image.dtype == np.float16 and first[0].image.shape == (24, 32, 32)
    assert isinstance(first[0].image, np.memmap)
    assert first[0].label_full.shape == (64, 64, 24)

    calls = []
    real_load = uh.load_case
    monkeypatch.setattr(uh, "load_case", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    again = uh.preprocess_dataset(cases, cache, image_size=32, workers=0, progress=False, clean=False)
    assert calls == [] and all(c.from_cache for c in again)
    np.testing.assert_array_equal(again[2].image, first[2].image)

    uh.preprocess_dataset(cases, cache, image_size=32, hu_window=(-200, 250), workers=0, progress=False, clean=False)
    assert len(calls) == len(cases)  # a parameter change re-decodes everything

    calls.clear()
    st = cases[1].image.stat()
    os.utime(cases[1].image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = uh.preprocess_dataset(cases, cache, image_size=32, workers=0, progress=False, clean=False)
    assert [c.case_id for c in third if not c.from_cache] == [cases[1].case_id]
    assert len(calls) == 1
    removed, freed = uh.remove_stale_entries(cache, cases, keep=[c.meta["entry"] for c in third])
    assert len(removed) == len(cases) + 1 and freed > 0  # the (-200, 250) entries + the old liver_1
    again = uh.preprocess_dataset(cases, cache, image_size=32, workers=0, progress=False, clean=False)
    assert all(c.from_cache for c in again)
    os.utime(cases[1].image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _hash_tree(synthetic_dir) == before  # nothing written into the data folder


def test_interrupted_cache_write_is_not_trusted(synthetic_dir, tmp_path, monkeypatch):
    cases = uh.find_cases(synthetic_dir)[:2]
    cache = tmp_path / "cache"
    real_save = np.save
    n = {"saves": 0}

    def dying_save(path, arr, *a, **k):
        n["saves"] += 1
        if n["saves"] == 2:
            raise KeyboardInterrupt("killed mid-write")
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        uh.preprocess_dataset(cases, cache, image_size=32, workers=0, progress=False)
    monkeypatch.setattr(np, "save", real_save)
    assert not [p for p in cache.iterdir() if not p.name.startswith(".tmp-")]  # nothing half-written trusted
    # a stale temp folder from a hard kill is ignored as well
    (cache / ".tmp-liver_0-dead").mkdir()
    out = uh.preprocess_dataset(cases, cache, image_size=32, workers=0, progress=False)
    assert not any(c.from_cache for c in out)
    assert out[0].image.shape == (24, 32, 32)


def test_parallel_workers_match_serial(synthetic_dir, tmp_path):
    cases = uh.find_cases(synthetic_dir)[:4]
    serial = uh.preprocess_dataset(cases, tmp_path / "a", image_size=32, workers=0, progress=False)
    para = uh.preprocess_dataset(cases, tmp_path / "b", image_size=32, workers=2, progress=False)
    for s, p in zip(serial, para):
        np.testing.assert_array_equal(s.image, p.image)
        np.testing.assert_array_equal(s.label, p.label)


def test_cache_inside_data_folder_refused(synthetic_dir):
    cases = uh.find_cases(synthetic_dir)
    with pytest.raises(ValueError, match="inside the data folder"):
        uh.preprocess_dataset(cases, synthetic_dir / "images" / "cache", image_size=32, progress=False)


# ---------------------------------------------------------------- data sets
def test_split_is_patient_level_and_deterministic():
    ids = [f"liver_{i}" for i in range(20)]
    with pytest.warns(UserWarning, match="only 4 validation cases"):
        tr, va = uh.split_cases(ids, 0.2, seed=1)
    assert len(va) == 4 and not set(tr) & set(va) and sorted(tr + va, key=uh.natural_key) == ids
    assert uh.split_cases(ids, 0.2, seed=1) == (tr, va)
    assert uh.split_cases(ids, 0.2, seed=2) != (tr, va)


def test_slice_selection_set_and_sampler(synthetic_dir, tmp_path):
    cached = uh.preprocess_dataset(uh.find_cases(synthetic_dir)[:3], tmp_path / "c", image_size=32,
                                   workers=0, progress=False)
    sel = uh.select_slices(cached, empty_fraction=0.5, seed=0)
    liver = np.concatenate([c.has_liver for c in cached])
    assert liver[sel].sum() == liver.sum()  # every liver slice kept
    n_empty = (~liver).sum()
    assert (~liver[sel]).sum() == pytest.approx(n_empty * 0.5, abs=3)
    s = uh.SliceSet(cached, context=3)
    assert len(s) == sum(c.n_slices for c in cached)
    x, y = s.batch(np.array([0, 24, 71]))
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    # slice 24 is the first of case 2: its lower neighbour is replicated, not taken from case 1
    np.testing.assert_array_equal(x[1, 0].numpy(), x[1, 1].numpy())
    np.testing.assert_array_equal(x[1, 1].numpy(), np.asarray(cached[1].image[0], np.float32))
    np.testing.assert_array_equal(y[2].numpy(), cached[2].label[23])
    lazy = uh.SliceSet(cached, context=3, resident=False)  # reads the memory-mapped cache per batch
    assert s.resident and not lazy.resident
    for a, b in zip(s.batch(np.array([0, 24, 71])), lazy.batch(np.array([0, 24, 71]))):
        assert torch.equal(a, b)
    samp = uh.TumorAwareSampler(sel, s.has_liver, s.has_tumor, batch_size=8, tumor_share=0.5, seed=0)
    batches = samp.epoch(0)
    assert s.has_tumor.sum() >= 4  # these three synthetic cases have tumour slices to draw from
    assert all(s.has_tumor[b].sum() >= 4 for b in batches)
    assert all(np.isin(b, sel).all() for b in batches)
    assert [b.tolist() for b in samp.epoch(0)] == [b.tolist() for b in batches]


def test_lesion_contrast_groups_by_hand():
    """Window -100..400 HU (500 HU wide): liver 0.4, a hypodense lesion 0.3 (-50 HU), a hyperdense one 0.46
    (+30 HU) and a faint one 0.42 (+10 HU), placed so that no two lesions touch (26-connectivity)."""
    image = np.full((4, 8, 8), 0.4, np.float16)
    label = np.ones((4, 8, 8), np.uint8)
    image[:, :4], label[:, :4] = 0.0, 0  # half of each slice is background (air), which the liver level must skip
    image[1:3, 4:6, 1] = 0.3
    label[1:3, 4:6, 1] = 2  # hypodense: slices 1 and 2 (2 voxels each), one component
    image[2:4, 7, 6] = 0.46
    label[2:4, 7, 6] = 2  # hyperdense: slices 2 and 3, one voxel each
    image[3, 4:6, 4] = 0.42
    label[3, 4:6, 4] = 2  # faint: slice 3, two voxels
    has = (label == 2).any(axis=(1, 2))
    case = uh.CachedCase("c", image, label, None, label.any(axis=(1, 2)) > 0, has, {"hu_window": [-100.0, 400.0]})
    # slice 0: no lesion; 1: hypodense only; 2: the hyperdense voxel beats two hypodense ones (the rarer
    # look wins); 3: faint (2 voxels) beats hyperdense (1 voxel)
    np.testing.assert_array_equal(uh.lesion_contrast_groups(case), [-1, 0, 2, 1])
    # a 5 HU band makes the +10 HU lesion hyperdense: slice 3 then holds 3 hyperdense voxels
    np.testing.assert_array_equal(uh.lesion_contrast_groups(case, band_hu=5.0), [-1, 0, 2, 2])


def test_contrast_balanced_sampler_draws_each_group_equally():
    """Ten tumour slices, one of them hyperdense: uniform draws take it 1 time in 10, balanced ones 1 in 2. One
    tumour slice has no group (its lesion vanished at network resolution): it is drawn with the hypodense."""
    pool = np.arange(16)
    has_tumor = np.arange(16) < 10
    groups = np.where(has_tumor, 0, -1)
    groups[9], groups[8] = 2, -1
    shares = []
    for tumor_groups in (None, groups):
        samp = uh.TumorAwareSampler(pool, has_tumor, has_tumor, batch_size=8, tumor_share=1.0, seed=0,
                                    tumor_groups=tumor_groups)
        draws = np.concatenate([b for e in range(500) for b in samp.epoch(e)])  # 2 batches of 8 per epoch
        assert len(draws) == 8000 and has_tumor[draws].all()
        shares.append((np.mean(draws == 9), np.mean(draws == 8)))
    # uniform: 1/10 each; balanced: slice 9 is 1/2, slice 8 one of the 9 hypodense slices of the other half: 1/18
    assert abs(shares[0][0] - 0.1) < 0.02 and abs(shares[1][0] - 0.5) < 0.03  # 5-6 standard errors
    assert abs(shares[0][1] - 0.1) < 0.02 and abs(shares[1][1] - 1 / 18) < 0.015


def test_random_patches_by_hand():
    """10×10 slices, 4×4 windows; sample 0 has one tumour pixel at (8, 1) (off the diagonal, so that a swap of
    row and column shows), sample 1 none."""
    x = torch.arange(2 * 3 * 10 * 10, dtype=torch.float32).reshape(2, 3, 10, 10)
    y = torch.zeros(2, 10, 10, dtype=torch.long)
    y[0, 8, 1] = 2
    gen = torch.Generator().manual_seed(0)
    with_tumour = 0
    for _ in range(4000):
        xs, ys = uh.random_patches(x, y, 4, generator=gen)
        for b in range(2):  # each window is one block of its own sample, the same block of image and label
            top, left = divmod(int(xs[b, 0, 0, 0]) - 300 * b, 10)
            assert torch.equal(xs[b], x[b, :, top:top + 4, left:left + 4])
            assert torch.equal(ys[b], y[b, top:top + 4, left:left + 4])
        with_tumour += int((ys[0] == 2).any())
    # the centre is the tumour pixel with weight 1 + 100 of 200, any other with weight 1; a window holds (8, 1)
    # when its top is 5 or 6 (centre row 7-9) and its left is 0 or 1 (centre column 0-3): 12 centres, weight
    # 101 + 11 (row and column swapped: 0.06)
    assert abs(with_tumour / 4000 - 112 / 200) < 0.03  # 0.56, about 4 standard errors
    assert uh.random_patches(x, y, 10)[0] is x  # a window as large as the slice: the slice itself


def test_window_centres_draw_each_tumour_pixel_alike():
    """Two tumour pixels in a 10×10 slice, windows of 1 pixel (the window is its centre): each tumour pixel
    is drawn with probability 1/2 × 1/2 + 1/2 × 1/100 = 0.255, any other pixel 1/200."""
    y = torch.zeros(1, 10, 10, dtype=torch.long)
    y[0, 2, 7] = y[0, 8, 1] = 2
    gen = torch.Generator().manual_seed(0)
    n, hits = 8000, {(2, 7): 0, (8, 1): 0}
    for _ in range(n):
        top, left = uh.patch_origins(y, 1, gen)
        key = (int(top), int(left))
        hits[key] = hits.get(key, 0) + 1
    for pixel in ((2, 7), (8, 1)):
        assert abs(hits[pixel] / n - 0.255) < 0.02  # about 4 standard errors
    with pytest.raises(ValueError, match="square"):
        uh.patch_origins(torch.zeros(1, 10, 12, dtype=torch.long), 4, gen)
    x12 = torch.rand(1, 1, 10, 12)
    with pytest.raises(ValueError, match="square"):  # also where the window is as wide as the slice
        uh.augment_batch(x12, torch.zeros(1, 10, 12, dtype=torch.long), gen, window=12)


def test_windows_cut_inside_the_augmentation_are_those_cut_after_it():
    """``augment_batch(window=...)`` warps only the window; without noise its pixels are those of the older
    path, the whole slice augmented and then cut by ``random_patches`` (the same draws, in the same order)."""
    x = torch.rand(4, 3, 40, 40)
    y = torch.zeros(4, 40, 40, dtype=torch.long)
    y[:, 10:30, 5:25] = 1
    y[0, 12:16, 20:24] = 2
    y[2, 30:33, 8:11] = 2
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        xc, yc = uh.random_patches(*uh.augment_batch(x, y, gen, uh.Augmentation(noise=0.0)), 16, generator=gen)
        xw, yw = uh.augment_batch(x, y, torch.Generator().manual_seed(seed), uh.Augmentation(noise=0.0), window=16)
        assert xw.shape == (4, 3, 16, 16) and yw.shape == (4, 16, 16)
        assert torch.equal(xw, xc) and torch.equal(yw, yc)
        # noise is drawn after the window, on the window alone: the same windows, other pixels
        xn, yn = uh.augment_batch(x, y, torch.Generator().manual_seed(seed), window=16)
        assert torch.equal(yn, yw) and not torch.equal(xn, xw)
    assert uh.augment_batch(x, y, torch.Generator().manual_seed(0), window=40)[0].shape == x.shape  # no cut


# ---------------------------------------------------------------- synthetic set
def test_synthetic_set_layout_dtypes_determinism(synthetic_dir, tmp_path):
    cases = uh.find_cases(synthetic_dir)
    assert [c.case_id for c in cases] == [f"liver_{i}" for i in range(6)]
    nimg = nib.load(str(cases[0].image))
    assert nimg.get_data_dtype() == np.int16 and nib.load(str(cases[0].label)).get_data_dtype() == np.uint8
    axcodes = {nib.aff2axcodes(nib.load(str(c.image)).affine) for c in cases}
    assert axcodes == {("R", "A", "S"), ("L", "P", "S")}  # both header orientations occur in the set
    again = uh.make_synthetic_dataset(tmp_path / "again", n_cases=2, shape=(64, 64, 24), seed=3, progress=False)
    for i in range(2):
        a = nib.load(str(synthetic_dir / "images" / f"liver_{i}.nii.gz")).get_fdata()
        b = nib.load(str(tmp_path / "again" / "images" / f"liver_{i}.nii.gz")).get_fdata()
        np.testing.assert_array_equal(a, b)
    other = uh.synthetic_ct_volume((64, 64, 24), seed=uh.hash_seed(4, 0))[0]
    assert not np.array_equal(other, nib.load(str(cases[0].image)).get_fdata())
    assert again["settings"]["seed"] == 3


def test_synthetic_statistics_like_lits():
    labels, facts, n_with_tumour = [], [], 0
    for i in range(10):
        img, lab, aff, f = uh.synthetic_ct_volume((96, 96, 40), seed=uh.hash_seed(11, i))
        labels.append(lab)
        facts.append(f)
        assert set(np.unique(lab)) <= {0, 1, 2}
        liver = lab >= 1
        share = liver.any(axis=(0, 1)).mean()
        assert 0.3 <= share <= 0.5, share
        cx = np.argwhere(liver)[:, 0].mean()
        assert cx > 48  # liver on the patient's right
        n_with_tumour += bool((lab == 2).any())
        if (lab == 2).any():
            burden = (lab == 2).sum() / liver.sum()
            assert 0.001 <= burden <= 0.08, burden
            les_hu = img[lab == 2].mean()
            liv_hu = img[lab == 1].mean()
            assert abs(les_hu - liv_hu) < 80
        assert 100 <= f["liver_hu"] <= 130 and 10 <= f["noise_hu"] <= 20
        # the liver's neighbours share its HU: a threshold alone does not find it
        band = (img > f["liver_hu"] - 25) & (img < f["liver_hu"] + 25)
        assert (band & ~liver).sum() > 0.2 * (band & liver).sum()
    assert n_with_tumour >= 5  # the tumour checks above ran on most cases (15 % are tumour-free by design)
    stats = uh.class_statistics(labels)
    assert 0.0005 < stats["voxel_share"]["tumor"] < stats["voxel_share"]["liver"] < 0.2
    assert 0.001 <= stats["tumor_share_of_liver_median"] <= 0.07
    n_les = [len(f["lesions"]) for f in facts]
    assert max(n_les) <= 8
    radii = [les["radius_mm"] for f in facts for les in f["lesions"]]
    assert min(radii) >= 2 and max(radii) <= 25


# ---------------------------------------------------------------- notebook helpers
def test_find_data_order_and_synthetic_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(uh, "KAGGLE_INPUT", tmp_path / "kaggle_input")
    assert uh.find_data() == ([], None)  # nothing anywhere
    uh.make_synthetic_dataset("data/synthetic", n_cases=2, shape=(32, 32, 12), seed=0, progress=False)
    cases, root = uh.find_data()
    assert root == tmp_path / "data" / "synthetic" or str(root) == "data/synthetic"
    assert uh.is_synthetic(cases) and len(cases) == 2
    _pair(tmp_path / "data" / "real", "images", "labels", ["liver_0"])  # real data beside the synthetic set
    cases, root = uh.find_data()
    assert [c.case_id for c in cases] == ["liver_0"] and not uh.is_synthetic(cases)  # synthetic excluded
    _pair(tmp_path / "kaggle_input" / "ds" / "Task03_Liver_rs", "images", "labels", ["liver_5", "liver_7"])
    cases, root = uh.find_data()
    assert [c.case_id for c in cases] == ["liver_5", "liver_7"]  # the Kaggle mount comes first
    cases, root = uh.find_data(tmp_path / "data" / "real")  # DATA_DIR wins over everything
    assert [c.case_id for c in cases] == ["liver_0"]


def test_find_data_explicit_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(uh.CTDataError, match="No CT cases found"):
        uh.find_data(tmp_path / "empty")


def test_resolve_settings_presets_and_recipe():
    import torch
    base = {"RECIPE": "default", "PRESET": None, "EPOCHS": None, "IMAGE_SIZE": None, "BATCH_SIZE": 8,
            "LR": None, "BASE_CHANNELS": None, "DEPTH": None, "CONTEXT_SLICES": None, "CASCADE": None}
    s, notes = uh.resolve_settings(base, torch.device("cpu"), synthetic=False)
    assert s["PRESET"] == "quick" and s["IMAGE_SIZE"] == 128 and s["BATCH_SIZE"] == 8  # set values are kept
    assert s["CONTEXT_SLICES"] == uh.RECIPES["default"]["context"] and any("no CUDA GPU" in n for n in notes)
    s, _ = uh.resolve_settings(base, torch.device("cuda"), synthetic=False)
    assert s["PRESET"] == "full" and s["IMAGE_SIZE"] == 256
    s, _ = uh.resolve_settings(base, torch.device("cuda"), synthetic=True)
    assert s["PRESET"] == "quick"
    s, _ = uh.resolve_settings({**base, "RECIPE": "baseline", "CASCADE": True}, torch.device("cpu"), False)
    assert s["CONTEXT_SLICES"] == 1 and s["CASCADE"] is True
    with pytest.raises(ValueError, match="PRESET"):
        uh.resolve_settings({**base, "PRESET": "huge"}, torch.device("cpu"), False)
    s, _ = uh.resolve_settings(base, torch.device("cpu"), False)
    assert s["LOSS"] == s["RECIPE_SETTINGS"]["loss"] == "dice_ce"
    s, _ = uh.resolve_settings({**base, "LOSS": "dice_ce_per_slice"}, torch.device("cpu"), False)
    assert s["RECIPE_SETTINGS"]["loss"] == "dice_ce_per_slice" and uh.recipe("default")["loss"] == "dice_ce"  # a copy
    with pytest.raises(ValueError, match="LOSS must be one of"):
        uh.resolve_settings({**base, "LOSS": "mse"}, torch.device("cpu"), False)
    # the default's stage 2 trains on windows 0.4 of its box: 0.4 x 160 = 64 (a multiple of 2^4, the quick depth)
    s, notes = uh.resolve_settings(base, torch.device("cpu"), False, (256, 256, 48))
    assert s["ROI_SIZE"] == 160 and s["PATCH_SIZE"] == 64 and any(n.startswith("PATCH_SIZE = 64") for n in notes)
    assert s["RECIPE_SETTINGS"]["stage2_window_fraction"] == 0.4 and s["CASCADE_CORE_MM"] == uh.CASCADE_CORE_MM == 2.0
    assert s["RECIPE_SETTINGS"]["stage1_share"] == 0.2  # and stage 1 a fifth of the epochs: 20 -> 4 + 16
    assert any("stage 1 (liver box) trains 4 epochs, stage 2 (liver box at native resolution) 16" in n for n in notes)
    s, _ = uh.resolve_settings({**base, "DEPTH": 5}, torch.device("cpu"), False, (512, 512, 48))
    assert s["ROI_SIZE"] == 320 and s["PATCH_SIZE"] == 128  # 0.4 x 320 = 128 = 4 x 32
    s, _ = uh.resolve_settings({**base, "DEPTH": 5}, torch.device("cpu"), False, (192, 192, 48))
    assert s["ROI_SIZE"] == 128 and s["PATCH_SIZE"] == 64  # 0.4 x 128 = 51.2 -> 1.6 x 32 -> 2 x 32
    s, _ = uh.resolve_settings({**base, "PATCH_SIZE": 0}, torch.device("cpu"), False, (256, 256, 48))
    assert s["PATCH_SIZE"] is None  # 0: whole boxes, whatever the recipe says (stored as None)
    assert s["RECIPE_SETTINGS"]["stage2_window_fraction"] is None  # and the printed recipe says so
    s, _ = uh.resolve_settings({**base, "PATCH_SIZE": 64}, torch.device("cpu"), False, (256, 256, 48))
    assert s["PATCH_SIZE"] == 64 and s["RECIPE_SETTINGS"]["stage2_window_fraction"] == 0.4  # 64 / 160
    s, notes = uh.resolve_settings({**base, "PATCH_SIZE": 64, "CASCADE": False}, torch.device("cpu"), False,
                                   (256, 256, 48))
    assert s["PATCH_SIZE"] is None and s["RECIPE_SETTINGS"]["stage2_window_fraction"] is None  # no stage 2, no windows
    assert s["RECIPE_SETTINGS"]["stage1_share"] is None  # one stage: no split
    assert s["RECIPE_SETTINGS"]["stage2_mirror"] is False  # and no stage 2 to mirror
    assert any("is unused" in n for n in notes)
    s, _ = uh.resolve_settings({**base, "RECIPE": "baseline", "CASCADE": True}, torch.device("cpu"), False,
                               (256, 256, 48))
    assert s["PATCH_SIZE"] is None  # the baseline recipe trains stage 2 on whole boxes
    assert s["RECIPE_SETTINGS"]["stage1_share"] == 1 / 3  # a recipe without a split: stage 1 a third
    # windows of 96 from boxes of 160 show (160 / 96)² = 2.78 x fewer pixels a step: 10 steps -> ceil(27.8) = 28
    assert uh.patch_steps(10, 160, 96) == 28 and uh.patch_steps(10, 160, None) == 10


def test_format_table_and_describe_results():
    rows = [{"case": "liver_1", "dice": 0.91234, "t": float("nan")}]
    text = uh.format_table(rows, ["case", "dice", "t"])
    assert text.splitlines()[1].split() == ["liver_1", "0.912", "-"]
    summary = {"n_cases": 3, "n_cases_with_tumor": 2, "dice_liver": 0.95, "dice_liver_lits": 0.96,
               "dice_tumor": 0.4, "dice_tumor_global": 0.6, "fp_tumor_ml_tumor_free_cases": 0.5,
               "dice_liver_raw": 0.94, "dice_tumor_raw": 0.38, "dice_tumor_all_cases": 0.3, "dice_mean": 0.7,
               "median_tumor_volume_ratio": 0.8, "hd95_liver_lits_mm": 4.0, "assd_liver_lits_mm": 1.0,
               "n_hd95_liver_lits_mm_undefined": 1, "ci95": {"dice_tumor": [0.25, 0.55]}, "dice_tumor_lits": 0.45,
               "tumor_burden_rmse": 0.02, "tumor_burden_max_error": 0.05}
    words = uh.describe_results(summary, synthetic=True)
    lines = words.splitlines()
    assert lines[0].startswith("3 validation cases (2 with tumour) of SYNTHETIC") and "'last' checkpoint" in lines[0]
    assert "not comparable" in words and "For a paper" in words
    row = next(ln for ln in lines if ln.startswith("tumour Dice, cases with tumour"))
    assert "0.400 [0.250, 0.550]" in row  # a mean with its interval
    lits = next(ln for ln in lines if ln.startswith("tumour Dice per case (LiTS)"))
    assert "0.450" in lits and lits.rstrip().endswith("report")
    nnunet = next(ln for ln in lines if "nnU-Net convention" in ln)
    assert "0.300" in nnunet and not nnunet.rstrip().endswith("report")
    assert "liver Dice 0.940 -> 0.950" in words and "undefined HD95 (empty prediction): 1 case" in words
    assert not any(ln.startswith("lesion recall") for ln in lines)  # no lesion keys, no lesion row
    rows = [ln for ln in lines[2:] if not ln.startswith(("post-processing", "For a paper"))]
    assert len(rows) == 9  # every row whose keys the summary holds
    assert "SYNTHETIC" not in uh.describe_results(summary, synthetic=False)
    assert sum(ln.rstrip().endswith("report") for ln in rows) == 3  # liver per case, tumour per case and global


def test_synthetic_lesion_size_and_contrast_knobs():
    shape = (64, 64, 24)
    for seed in range(8):  # a seed whose case has lesions
        img, lab, _aff, facts = uh.synthetic_ct_volume(shape, seed)
        if facts["lesions"]:
            break
    assert facts["lesions"], "no seed in 0-7 gave a case with lesions"
    small_img, small_lab, _aff, small = uh.synthetic_ct_volume(shape, seed, lesion_size_scale=0.6,
                                                               lesion_contrast_scale=0.6)
    assert len(small["lesions"]) == len(facts["lesions"])
    np.testing.assert_array_equal(small_lab >= 1, lab >= 1)  # same anatomy: only the lesions change
    assert 0 < (small_lab == 2).sum() < (lab == 2).sum()
    for big, little in zip(facts["lesions"], small["lesions"]):  # the same draws, scaled
        assert little["kind"] == big["kind"]
        assert abs(little["radius_mm"] - 0.6 * big["radius_mm"]) <= 0.1  # radii are stored rounded to 0.1 mm
        assert abs(little["delta_hu"] - 0.6 * big["delta_hu"]) <= 0.1


def test_cascade_default_only_where_stage_two_gains_resolution():
    base = {"RECIPE": "default", "PRESET": "full"}  # full preset: IMAGE_SIZE 256
    on_512, _ = uh.resolve_settings(base, torch.device("cpu"), False, native_shape=(512, 512, 90))
    assert on_512["CASCADE"] is True and on_512["ROI_SIZE"] == 320  # 256² stage 1, native 320-pixel window
    # the Kaggle set's 256² slices: stage 1 at half of them (128²), stage 2 on the native 160-pixel window
    kaggle, notes = uh.resolve_settings(base, torch.device("cpu"), False, native_shape=(256, 256, 90))
    assert (kaggle["CASCADE"], kaggle["IMAGE_SIZE"], kaggle["ROI_SIZE"]) == (True, 128, 160)
    assert any(n.startswith("IMAGE_SIZE = 128") and "half the CT's 256" in n for n in notes)
    assert not any(n.startswith("IMAGE_SIZE = 256") for n in notes)  # the preset's value is not shown as chosen
    one_stage = uh.resolve_settings({**base, "RECIPE": "baseline"}, torch.device("cpu"), False, (256, 256, 90))[0]
    assert one_stage["IMAGE_SIZE"] == 256  # no cascade, no stage 1: the preset's size
    yours, notes = uh.resolve_settings({**base, "IMAGE_SIZE": 256}, torch.device("cpu"), False, (256, 256, 90))
    assert yours["CASCADE"] is False and any("gain no resolution" in n for n in notes)  # your size is kept
    forced, _ = uh.resolve_settings({**base, "CASCADE": True}, torch.device("cpu"), False, native_shape=(256, 256, 90))
    assert forced["CASCADE"] is True and forced["IMAGE_SIZE"] == 128  # kept, and stage 1 below native too
    quick, _ = uh.resolve_settings({"RECIPE": "default"}, torch.device("cpu"), True, native_shape=(192, 192, 48))
    assert quick["CASCADE"] is True and quick["IMAGE_SIZE"] == 128 and quick["ROI_SIZE"] == 128
    assert uh.resolve_settings({"RECIPE": "baseline"}, torch.device("cpu"), True, (192, 192, 48))[0]["CASCADE"] is False


def test_prefetched_batches_equal_direct_gathering(synthetic_dir, tmp_path):
    """iter_batches (a background thread reads one batch ahead) yields exactly what SliceSet.batch gives,
    in order, for slices in RAM and for memory-mapped ones; pinned memory itself needs CUDA (not shown here)."""
    cached = uh.preprocess_dataset(uh.find_cases(synthetic_dir)[:3], tmp_path / "c", image_size=32, workers=0,
                                   progress=False)
    batches = [np.array([0, 24, 71, 5]), np.array([70, 1, 2, 3]), np.array([30, 31, 60, 10])]
    direct = uh.SliceSet(cached, context=3, resident=True)  # gathered in RAM, no thread
    for resident in (True, False):  # memory-mapped slices go through the read-ahead thread
        s = uh.SliceSet(cached, context=3, resident=resident)
        got = list(uh.iter_batches(s, batches, torch.device("cpu")))
        assert len(got) == 3
        for (x, y), idx in zip(got, batches):
            ex, ey = direct.batch(idx)
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            assert torch.equal(x, ex) and torch.equal(y, ey)
            # by hand: the middle channel is the slice itself, the label its own
            case = int(np.searchsorted(s.offsets, idx[0], side="right") - 1)
            np.testing.assert_array_equal(x[0, 1].numpy(), np.asarray(cached[case].image[idx[0] - s.offsets[case]],
                                                                         np.float32))
    assert list(uh.iter_batches(s, [], torch.device("cpu"))) == []


def test_cache_dir_defaults_off_quotad_output_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(uh, "KAGGLE_WORKING", tmp_path / "no-kaggle")
    assert uh.default_cache_dir(tmp_path / "out") == (tmp_path / "out" / "cache").resolve()
    monkeypatch.setattr(uh, "COLAB_DRIVE", tmp_path / "drive")
    assert uh.default_cache_dir(tmp_path / "drive" / "MyDrive" / "run") == tmp_path / "liver_cache"
    (tmp_path / "kaggle" / "working").mkdir(parents=True)
    monkeypatch.setattr(uh, "KAGGLE_WORKING", tmp_path / "kaggle" / "working")
    monkeypatch.setattr(uh, "KAGGLE_TEMP", tmp_path / "kaggle" / "temp")
    assert uh.default_cache_dir("outputs") == tmp_path / "kaggle" / "temp" / "liver_cache"


def test_cache_space_is_checked_before_writing(synthetic_dir, tmp_path, monkeypatch):
    cases = uh.find_cases(synthetic_dir)[:2]
    certain, likely = uh.cache_bytes_needed(cases, 32, roi_size=40)
    # by hand: 24 slices of 32 x 32 at 3 bytes (float16 image + uint8 label) per case; plus 24 x 40 x 40 x 3
    # liver-box bytes and a quarter of the 64 x 64 x 24 label volume
    assert certain == 2 * 24 * 32 * 32 * 3
    assert likely == certain + 2 * (24 * 40 * 40 * 3 + 64 * 64 * 24 // 4)
    real_usage = uh.shutil.disk_usage

    def usage(free):
        return lambda p: real_usage(p)._replace(free=free)

    monkeypatch.setattr(uh.shutil, "disk_usage", usage(uh.CACHE_RESERVE_BYTES + certain - 1))
    with pytest.raises(uh.CacheSpaceError, match=r"needs at least 0\.0 GB .*CACHE_DIR") as err:
        uh.preprocess_dataset(cases, tmp_path / "cache", image_size=32, workers=0, progress=False)
    assert str(tmp_path / "cache") in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing written
    monkeypatch.setattr(uh.shutil, "disk_usage", usage(uh.CACHE_RESERVE_BYTES + certain))
    with pytest.warns(UserWarning, match="may need up to"):
        uh.preprocess_dataset(cases, tmp_path / "cache", image_size=32, workers=0, progress=False, roi_size=40)
    monkeypatch.setattr(uh.shutil, "disk_usage", usage(0))  # a full disk, and nothing left to write: fine
    assert all(c.from_cache for c in uh.preprocess_dataset(cases, tmp_path / "cache", image_size=32, workers=0,
                                                           progress=False, roi_size=40))


def test_full_disk_during_caching_stops_clearly_and_keeps_finished_entries(synthetic_dir, tmp_path, monkeypatch):
    cases = uh.find_cases(synthetic_dir)[:3]
    real_save, n = np.save, {"saves": 0}

    def save(path, arr, *a, **k):
        n["saves"] += 1
        if n["saves"] > 5:  # the second case runs out of disk
            raise OSError(uh.errno.ENOSPC, "No space left on device")
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(uh.np, "save", save)
    with pytest.raises(uh.CacheSpaceError, match="is full"):
        uh.preprocess_dataset(cases, tmp_path / "cache", image_size=32, workers=0, progress=False)
    monkeypatch.setattr(uh.np, "save", real_save)
    left = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(left) == 1 and left[0].startswith(cases[0].case_id + "-")  # no half-written entry
    again = uh.preprocess_dataset(cases, tmp_path / "cache", image_size=32, workers=0, progress=False)
    assert [c.from_cache for c in again] == [True, False, False]


def test_stale_cache_entries_of_this_data_are_removed_and_said(synthetic_dir, tmp_path, capsys):
    cases = uh.find_cases(synthetic_dir)[:2]
    cache = tmp_path / "cache"
    old = uh.preprocess_dataset(cases, cache, image_size=32, workers=0, progress=False)
    other = cache / "liver_0-0123456789abcdef"  # another data set's case of the same id, in a shared folder: kept
    other.mkdir()
    (other / "meta.json").write_text('{"image_path": "/elsewhere/liver_0.nii.gz"}')
    (cache / ".tmp-liver_0-old").mkdir()
    os.utime(cache / ".tmp-liver_0-old", (0, 0))  # an interrupted write, hours old
    (cache / ".tmp-liver_0-new").mkdir()  # may belong to a run in progress: kept
    new = uh.preprocess_dataset(cases, cache, image_size=48, workers=0, progress=True, clean=True)
    said = capsys.readouterr().out
    assert "removed 3 stale entries" in said
    names = {p.name for p in cache.iterdir()}
    assert names == {Path(c.meta["entry"]).name for c in new} | {other.name, ".tmp-liver_0-new"}
    assert not any(Path(c.meta["entry"]).exists() for c in old)
    assert uh.preprocess_dataset(cases, cache, image_size=32, workers=0, progress=False)
    assert len(list(cache.iterdir())) == 2 + 2 + 2  # by default (clean=False) both settings' entries stay


def test_real_liver_slices_load_as_the_notebook_reads_them(real_slices, tmp_path):
    """The real slices (../shared/data/real_liver_slices): found in the Kaggle layout, read as real CT, 0/1 liver
    labels, RAS with the liver on the patient's right (+x), windowed liver inside the window, cached flags that
    match the labels. Counts from the folder's README: 61 patients, 291 slices of 256 x 256."""
    cases, root = uh.find_data(real_slices)
    assert Path(root) == real_slices and len(cases) == 61 and not uh.is_synthetic(cases)
    assert all(c.label is not None for c in cases)
    slices, right, liver_means = 0, 0, []
    for f in cases:
        case = uh.load_case(f.image, f.label, f.case_id)
        x, y, z = case.image.shape
        assert (x, y) == (256, 256) and 1 <= z <= 11, (f.case_id, case.image.shape)
        assert set(np.unique(case.label)) <= {0, 1}, f.case_id  # liver and tumour merged, as the README says
        assert case.image.min() >= 0 and case.image.max() <= 255  # HU clipped to the JPEGs' range
        liver = case.label >= 1
        assert liver.any(), f.case_id
        slices += z
        right += np.argwhere(liver)[:, 0].mean() > x / 2  # RAS: +x toward the patient's right
        liver_means.append(uh.window_hu(case.image)[liver].mean())
    assert slices == 291
    assert right >= 0.9 * len(cases), f"liver on the patient's right in only {right} of {len(cases)} patients"
    assert 0.25 < np.median(liver_means) < 0.6  # (HU + 100) / 500 for liver HU of ~25-200
    cached = uh.preprocess_dataset(cases[:4], tmp_path / "cache", 128, progress=False)
    for f, c in zip(cases[:4], cached):
        label = uh.load_case(f.image, f.label).label
        assert c.image.shape == (label.shape[2], 128, 128)
        np.testing.assert_array_equal(c.has_liver, (label >= 1).any(axis=(0, 1)))
