"""dataset.py: shapes out of the train/val chains, in-plane downsampling, label handling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from dataset import (
    AugmentParams,
    Caching,
    InplaneResize,
    get_transforms,
    label_mapping,
    majority_resize,
    make_dataset,
    nbytes,
)


def _items(prep_dir, split):
    manifest = json.loads((prep_dir / "dataset.json").read_text())
    return [{"image": str(prep_dir / c["prepared_image"]), "label": str(prep_dir / c["prepared_label"])}
            for c in manifest["cases"] if c["split"] == split], manifest


def test_train_chain_gives_roi_crops_padded_to_the_roi(prep_dir):
    items, _ = _items(prep_dir, "train")
    aug = AugmentParams(crop=(16, 64, 64), num_samples=3)  # depth 16 > the volumes' 8: padded
    samples = get_transforms("train", (0, 1), aug)(items[0])
    assert len(samples) == 3
    for s in samples:
        assert s["image"].shape == (1, 16, 64, 64) and s["image"].dtype == torch.float32
        assert s["label"].shape == (1, 16, 64, 64) and s["label"].dtype == torch.uint8
        assert set(s["label"].unique().tolist()) <= {0, 1}


def test_positive_crops_hold_foreground(prep_dir):
    items, _ = _items(prep_dir, "train")
    xforms = get_transforms("train", (0, 1), AugmentParams(crop=(8, 32, 32), pos=1, neg=0, num_samples=4))
    xforms.set_random_state(seed=0)
    assert all(s["label"].sum() > 0 for s in xforms(items[0]))


def test_val_chain_keeps_the_whole_volume(prep_dir):
    items, manifest = _items(prep_dir, "val")
    case = next(c for c in manifest["cases"] if c["split"] == "val")
    out = get_transforms("val", (0, 1))(items[0])
    assert out["image"].shape == (1, *case["prepared_shape"]) == out["label"].shape


def test_cache_dataset_caches_the_deterministic_prefix(prep_dir):
    items, _ = _items(prep_dir, "train")
    ds = make_dataset(items, "train", (0, 1), AugmentParams(crop=(8, 32, 32), num_samples=2))
    assert len(ds._cache) == len(items)  # cached once, before the random crops
    assert len(ds[0]) == 2


def test_label_values_are_mapped_to_class_indices():
    assert label_mapping([0, 1, 2]) == []
    (mapper,) = label_mapping([0, 255])
    assert mapper({"label": torch.tensor([[0, 255, 255]])})["label"].tolist() == [[0, 1, 1]]


@pytest.mark.parametrize("shape, expected", [((30, 512, 512), (30, 256, 256)), ((9, 200, 180), (9, 200, 180)),
                                             ((4, 600, 300), (4, 256, 128)), ((1, 765, 572), (1, 256, 191))])
def test_inplane_size_keeps_depth_and_aspect(shape, expected):
    assert InplaneResize(256).target_size(shape) == expected


def test_majority_resize_keeps_label_values_and_centre():
    label = torch.zeros(1, 1, 64, 64, dtype=torch.uint8)
    label[0, 0, 20:44, 10:30] = 7  # an even-sized box: its centre must not move when halved
    small = majority_resize(label, (1, 32, 32))
    assert set(small.unique().tolist()) == {0, 7}
    ys, xs = np.nonzero(small[0, 0].numpy())
    assert ((ys.mean() + 0.5) * 2 - 0.5, (xs.mean() + 0.5) * 2 - 0.5) == pytest.approx((31.5, 19.5))


def test_inplane_resize_updates_the_affine_and_inverts():
    img = MetaTensor(torch.rand(1, 4, 300, 300), affine=torch.diag(torch.tensor([2.5, 0.7, 0.7, 1.0])))
    resizer = InplaneResize(256)
    small = resizer(img)
    assert small.shape == (1, 4, 256, 256)
    assert small.affine.diagonal()[:3].tolist() == pytest.approx([2.5, 0.7 * 300 / 256, 0.7 * 300 / 256])
    back = resizer.inverse(small)
    assert back.shape == img.shape and torch.allclose(back.affine, img.affine)


@pytest.mark.parametrize("depth", [1, 12])
def test_body_mask_crops_dark_background_but_not_a_bright_frame(depth):
    from dataset import BodyMask, PrepParams

    rng = np.random.default_rng(0)
    head = np.zeros((depth, 64, 64), np.float32) + rng.normal(0, 2, (depth, 64, 64)).astype(np.float32)
    head[:, 16:48, 20:40] += 300  # an MR "head" in dark air
    mask = BodyMask(PrepParams(modality="mr"))(torch.from_numpy(head)[None])
    ys, xs = np.nonzero(mask[0].any(0).numpy())
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (16, 47, 20, 39)
    photo = 200 - head / 2  # bright skin filling the frame around a darker lesion
    assert BodyMask(PrepParams(modality="mr"))(torch.from_numpy(photo)[None]).all()


@pytest.mark.parametrize("depth", [1, 5])
def test_augmentation_turns_slices_in_plane_and_keeps_them(tmp_path, depth):
    """Rotations and flips act in the (H, W) plane: a centred disc keeps its size in every slice, even depth 1
    (zoom off)."""
    import nibabel as nib

    rows, cols = np.ogrid[:64, :64]
    disc = ((rows - 32) ** 2 + (cols - 32) ** 2 < 12**2).astype(np.uint8)
    label = np.repeat(disc[None], depth, axis=0)  # (D, H, W), the prepared layout
    for name, array in (("image", label.astype(np.float32)), ("label", label)):
        nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / f"{name}.nii.gz")
    item = {"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")}
    xforms = get_transforms("train", (0, 1), AugmentParams(crop=(depth, 64, 64), num_samples=1, scale_2d=(1.0, 1.0),
                                                         scale_3d=(1.0, 1.0)))
    for seed in range(12):
        xforms.set_random_state(seed=seed)
        out = xforms(item)[0]["label"][0]
        assert out.shape == (depth, 64, 64)
        assert np.allclose(out.sum((1, 2)).numpy(), disc.sum(), rtol=0.05)  # every slice keeps the disc


@pytest.mark.parametrize(("depth", "zoom"), [(1, (0.7, 1.4)), (6, (0.8, 1.2))])
def test_augmentation_zooms_and_changes_intensities_only_of_the_image(tmp_path, depth, zoom):
    """The zoom of a depth-1 crop (0.7 to 1.4, nnU-Net's) scales a disc's area by 1/1.4² to 1/0.7² and never empties
    it; a deeper crop's (0.8 to 1.2) the area of a cylinder's middle slice by 1/1.2² to 1/0.8². The intensity part
    changes image values (brightness, gamma, noise) but leaves the label's 0/1 alone."""
    import nibabel as nib

    rows, cols = np.ogrid[:64, :64]
    disc = ((rows - 32) ** 2 + (cols - 32) ** 2 < 12**2).astype(np.uint8)
    cylinder = np.repeat(disc[None], depth, axis=0)
    for name, array in (("image", cylinder.astype(np.float32)), ("label", cylinder)):
        nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / f"{name}.nii.gz")
    item = {"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")}
    xforms = get_transforms("train", (0, 1), AugmentParams(crop=(depth, 64, 64), num_samples=1))
    areas, retouched = [], 0
    for seed in range(40):
        xforms.set_random_state(seed=seed)
        out = xforms(item)[0]
        label, image = out["label"][0, depth // 2].numpy(), out["image"][0, depth // 2].numpy()
        assert set(np.unique(label)) == {0, 1}
        areas.append(label.sum() / disc.sum())
        retouched += not np.isin(image, (0.0, 1.0)).all()  # interpolation at the edge aside, values other than 0/1
    assert 1 / zoom[1] ** 2 - 0.05 <= min(areas) and max(areas) <= 1 / zoom[0] ** 2 + 0.05
    assert max(abs(a - 1) for a in areas) > 0.1  # some draws zoomed
    assert 0 < retouched < 40


@pytest.mark.parametrize("depth", [1, 5])
def test_intensity_augmentation_keeps_shape_and_the_gammas_keep_mean_and_spread(depth):
    """Each of nnU-Net's intensity transforms, forced on, keeps the crop's shape (one-slice crops too) and changes
    its values; both gammas (plain and of the inverted image) keep the image's mean and standard deviation, as
    nnU-Net's ``retain_stats``, and differ from each other."""
    from monai.transforms import RandAdjustContrastd

    from dataset import RandClipBrightd, intensity_augment

    image = torch.randn(1, depth, 32, 32, generator=torch.Generator().manual_seed(0))
    gammas = []
    for xform in intensity_augment(depth, "mr"):
        xform.prob = 1.0
        xform.set_random_state(seed=3)
        out = torch.as_tensor(xform({"image": image.clone()})["image"])
        assert out.shape == image.shape and torch.isfinite(out).all()
        assert not torch.allclose(out, image)
        if isinstance(xform, RandAdjustContrastd):
            assert float(out.mean()) == pytest.approx(float(image.mean()), abs=1e-4)
            assert float(out.std()) == pytest.approx(float(image.std()), rel=1e-3)
            gammas.append(out)
    assert len(gammas) == 2 and not torch.allclose(*gammas)
    # CT keeps its Hounsfield scale: no re-normalizing clip, no inverted gamma; a colour picture keeps its /255
    # scale: nnU-Net's set without the clip, which z-scores again (an MR scanner's look, not a camera's)
    assert not any(isinstance(x, RandClipBrightd) for x in intensity_augment(depth, "ct"))
    assert not any(isinstance(x, RandClipBrightd) for x in intensity_augment(depth, "rgb"))
    assert len(intensity_augment(depth, "rgb")) == len(intensity_augment(depth, "mr")) - 1
    assert len(intensity_augment(depth, "ct")) < len(intensity_augment(depth, "mr"))


def test_brightness_contrast_and_gamma_draw_for_each_channel():
    """As nnU-Net's (``synchronize_channels=False``): on three identical channels (an RGB picture of grey), each of
    these transforms, forced on, changes the channels apart (a colour shift), the gammas keeping each channel's mean
    and spread; on one channel the per-channel gamma draws exactly what MONAI's ``RandAdjustContrastd`` draws."""
    from monai.transforms import RandAdjustContrastd, RandScaleIntensityd, RandScaleIntensityFixedMeand

    from dataset import RandGammaPerChanneld, intensity_augment

    grey = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)) + 0.1
    rgb = grey.repeat(3, 1, 1, 1)
    per_channel = (RandGammaPerChanneld, RandScaleIntensityd, RandScaleIntensityFixedMeand)
    chosen = [x for x in intensity_augment(1, "mr") if isinstance(x, per_channel)]
    assert len(chosen) == 4
    for xform in chosen:
        xform.prob = 1.0
        xform.set_random_state(seed=1)
        out = torch.as_tensor(xform({"image": rgb.clone()})["image"])
        assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
        if isinstance(xform, RandGammaPerChanneld):
            for c in range(3):
                assert float(out[c].mean()) == pytest.approx(float(grey.mean()), abs=1e-4)
                assert float(out[c].std()) == pytest.approx(float(grey.std()), rel=1e-3)
    for invert in (False, True):
        ours = RandGammaPerChanneld("image", gamma=(0.7, 1.5), invert_image=invert, retain_stats=True, prob=0.5)
        monai = RandAdjustContrastd("image", gamma=(0.7, 1.5), invert_image=invert, retain_stats=True, prob=0.5)
        ours.set_random_state(seed=3)
        monai.set_random_state(seed=3)
        for _ in range(6):
            assert torch.equal(torch.as_tensor(ours({"image": grey})["image"]),
                               torch.as_tensor(monai({"image": grey})["image"]))


def test_clipping_the_bright_end_makes_the_lesion_as_bright_as_the_brightest_structure():
    """A bright ring (scalp, 4) around a dimmer lesion (2) on tissue (1): clipped at a percentile below the
    lesion's share, ring and lesion come out equally bright, the tissue below them, and the image is z-scored
    again (as a prepared image is); at prob 0 nothing changes."""
    from dataset import RandClipBrightd

    rows, cols = np.ogrid[:64, :64]
    r2 = (rows - 32) ** 2 + (cols - 32) ** 2
    image = np.ones((64, 64), np.float32)
    image[(r2 >= 29**2) & (r2 < 31**2)] = 4.0  # ring: 9% of the image
    image[r2 < 11.5**2] = 2.0  # lesion: 10%, so the 81st to 90th percentiles are the lesion's value
    x = torch.from_numpy(image)[None, None]
    xform = RandClipBrightd("image", prob=1.0, percentiles=(82.0, 90.0))
    for seed in range(5):
        xform.set_random_state(seed=seed)
        out = xform({"image": x.clone(), "label": "kept"})
        y = out["image"][0, 0].numpy()
        assert out["label"] == "kept"
        assert y[32, 32] == pytest.approx(y[32, 2]) and y[32, 32] > y[32, 20] + 1.0  # lesion = ring > tissue
        assert float(y.mean()) == pytest.approx(0.0, abs=1e-5) and float(y.std()) == pytest.approx(1.0, rel=1e-3)
    off = RandClipBrightd("image", prob=0.0)
    assert torch.equal(off({"image": x})["image"], x)


def test_random_crops_leave_the_cached_volumes_alone(prep_dir):
    """The cache is not deep-copied at each draw (copy_cache=False): the random part must make new arrays."""
    items, _ = _items(prep_dir, "train")
    ds = make_dataset(items, "train", (0, 1), AugmentParams(crop=(8, 32, 32), num_samples=3))
    before = [{k: torch.as_tensor(v).clone() for k, v in c.items() if k in ("image", "label")} for c in ds._cache]
    for seed in range(6):
        ds.transform.set_random_state(seed=seed)
        for i in range(len(ds)):
            for crop in ds[i]:
                crop["image"].add_(1.0)  # a consumer writing into its crop must not reach the cache either
                crop["label"].zero_()
    for cached, saved in zip(ds._cache, before):
        assert torch.equal(torch.as_tensor(cached["image"]), saved["image"])
        assert torch.equal(torch.as_tensor(cached["label"]), saved["label"])


def test_crop_centres_are_computed_once_and_point_at_their_class(prep_dir):
    from dataset import CropCentresd

    label = torch.zeros(1, 4, 10, 12, dtype=torch.uint8)
    label[0, 1:3, 2:5, 3:9] = 1
    out = CropCentresd("label")({"label": label})
    flat = label.flatten().numpy()
    assert out["label_fg"].dtype == np.int32 and len(out["label_fg"]) == int(flat.sum())
    assert (flat[out["label_fg"]] == 1).all() and (flat[out["label_bg"]] == 0).all()
    assert len(out["label_fg"]) + len(out["label_bg"]) == flat.size
    thin = CropCentresd("label", max_indices=10)({"label": label})
    assert 0 < len(thin["label_bg"]) <= 10 and (flat[thin["label_bg"]] == 0).all()
    # the training chain hands the crops on without them
    xforms = get_transforms("train", (0, 1), AugmentParams(crop=(4, 8, 8), num_samples=2))
    assert all(set(s) == {"image", "label"} for s in xforms(_items(prep_dir, "train")[0][0]))


def test_validation_caches_the_tissue_mask_inference_uses(prep_dir):
    from dataset import PrepParams, prepared_tissue

    items, manifest = _items(prep_dir, "val")
    params = PrepParams.from_dict(manifest["params"])
    ds = make_dataset(items, "val", (0, 1), AugmentParams(), params=params)
    out = ds[0]
    assert out["tissue"].dtype == torch.bool and out["tissue"].shape == out["image"].shape
    assert torch.equal(out["tissue"], prepared_tissue(out["image"], params))
    assert 0 < out["tissue"].float().mean() < 1  # the synthetic body, not the air around it
    assert "tissue" in ds._cache[0]  # computed once, with the volume


def test_cache_rate_caches_only_its_share(prep_dir):
    items, _ = _items(prep_dir, "train")
    half = make_dataset(items * 2, "train", (0, 1), AugmentParams(crop=(8, 32, 32), num_samples=1),
                        cache=Caching(0.5))
    assert len(half._cache) == len(items)  # the other half is read at every use
    assert all(len(half[i]) == 1 for i in range(len(half)))
    none = make_dataset(items, "train", (0, 1), AugmentParams(crop=(8, 32, 32), num_samples=1), cache=Caching(0))
    assert not hasattr(none, "_cache") and len(none[0]) == 1


def test_a_bounded_cache_gives_the_same_crops_from_memory_and_from_disk(prep_dir, tmp_path, monkeypatch):
    """Data larger than memory: the prefix's output goes to disk once, the first volumes that fit stay in memory
    too, and the seeded crops are those of the all-in-memory cache; a later run reads the disk copy (the prefix
    does not run again)."""
    from dataset import BoundedCache

    items, _ = _items(prep_dir, "train")
    aug = AugmentParams(crop=(8, 32, 32), num_samples=2)
    in_memory = make_dataset(items, "train", (0, 1), aug)
    one_volume = nbytes(in_memory._cache[0])
    bounded = make_dataset(items, "train", (0, 1), aug, cache=Caching(folder=tmp_path / "cache", memory=one_volume))
    assert isinstance(bounded, BoundedCache) and list(bounded.memory) == [0] and bounded.memory_bytes <= one_volume
    assert len(list((tmp_path / "cache").glob("*.pt"))) == len(items)
    for ds in (in_memory, bounded):
        ds.transform.set_random_state(seed=11)
    for k in range(len(items)):  # the first from memory, the others from disk
        for a, b in zip(in_memory[k], bounded[k]):
            assert torch.equal(torch.as_tensor(a["image"]), torch.as_tensor(b["image"]))
            assert torch.equal(torch.as_tensor(a["label"]), torch.as_tensor(b["label"]))
    monkeypatch.setattr(BoundedCache, "_pre_transform", lambda self, item: pytest.fail("ran the prefix again"))
    again = make_dataset(items, "train", (0, 1), aug, cache=Caching(folder=tmp_path / "cache", memory=0))
    assert again.memory == {} and len(again[1]) == 2
