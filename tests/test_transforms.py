"""BoundaryWeightMapd on real NIfTI files through MONAI's loading, resampling and caching."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import CacheDataset, MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandFlipd, Spacingd

from pipeline.transforms import BoundaryWeightMapd, weight_map_like
from pipeline.weightmap import boundary_weight_map


def two_boxes(shape=(20, 18, 8)) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[2:9, 3:15, 2:6] = 1
    lab[10:17, 3:15, 2:6] = 2
    return lab


@pytest.fixture
def case(tmp_path):
    affine = np.diag([1.5, 1.0, 3.0, 1.0])
    affine[:3, 3] = [-20.0, 7.0, 3.5]
    lab = two_boxes()
    nib.save(nib.Nifti1Image(lab, affine), tmp_path / "label.nii.gz")
    nib.save(nib.Nifti1Image(lab.astype(np.float32) * 100, affine), tmp_path / "image.nii.gz")
    return {"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")}


def test_spacing_comes_from_the_resampled_affine_and_map_is_cached(case):
    keys = ["image", "label"]
    deterministic = [
        LoadImaged(keys=keys), EnsureChannelFirstd(keys=keys),
        Spacingd(keys=keys, pixdim=(1.0, 1.0, 2.0), mode=("bilinear", "nearest")),
        BoundaryWeightMapd(keys="label", weight_key="weight", w0=10.0, sigma=3.0),
    ]
    ds = CacheDataset([case], Compose([*deterministic, RandFlipd(keys=[*keys, "weight"], prob=1.0,
                                                                 spatial_axis=0)]), progress=False)
    cached = ds._cache[0]  # everything before the first random transform
    label, weight = cached["label"], cached["weight"]
    assert isinstance(weight, MetaTensor) and weight.dtype == torch.float32 and weight.shape == label.shape
    np.testing.assert_allclose(weight.affine, label.affine)
    np.testing.assert_allclose(weight.pixdim, (1.0, 1.0, 2.0))
    expected = boundary_weight_map(label[0].numpy(), spacing=(1.0, 1.0, 2.0), w0=10.0, sigma=3.0)
    np.testing.assert_allclose(weight[0].numpy(), expected, atol=1e-6)
    unit = boundary_weight_map(label[0].numpy(), w0=10.0, sigma=3.0)
    assert np.abs(unit - expected).max() > 0.1  # the spacing mattered

    sample = ds[0]  # the random flip moved label and weight together
    np.testing.assert_allclose(sample["weight"][0].numpy(), np.flip(expected, 0), atol=1e-6)
    np.testing.assert_array_equal(sample["label"][0].numpy(), np.flip(label[0].numpy(), 0))


def test_meta_is_copied_not_shared():
    label = MetaTensor(torch.from_numpy(two_boxes()[None].astype(np.float32)), affine=torch.diag(torch.tensor([2.0, 1, 1, 1])))
    weight = weight_map_like(label, sigma=2.0)
    weight.meta["probe"] = 1
    assert "probe" not in label.meta


def test_plain_arrays_have_unit_spacing_and_stay_numpy():
    lab = two_boxes()[None]
    w = weight_map_like(lab, w0=5.0, sigma=2.0, border_on="background")
    assert isinstance(w, np.ndarray) and w.dtype == np.float32
    np.testing.assert_array_equal(w[0], boundary_weight_map(lab[0], w0=5.0, sigma=2.0, border_on="background"))


def test_one_slice_volume_and_empty_label():
    lab = two_boxes()[:, :, 3][None, None]  # (1, 1, H, W): a one-slice 3D label
    label = MetaTensor(torch.from_numpy(lab), affine=torch.diag(torch.tensor([4.0, 0.5, 2.0, 1.0])))
    w = weight_map_like(label, sigma=2.0)
    np.testing.assert_allclose(w[0, 0].numpy(), boundary_weight_map(lab[0, 0], (0.5, 2.0), sigma=2.0), atol=1e-6)
    empty = weight_map_like(MetaTensor(torch.zeros(1, 6, 6, 6)), class_weights="balanced")
    np.testing.assert_array_equal(empty.numpy(), np.ones((1, 6, 6, 6), np.float32))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="one channel"):
        weight_map_like(np.ones((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="non-integer"):
        BoundaryWeightMapd(keys="label")({"label": torch.rand(1, 8, 8)})


# -- lateral labels -----------------------------------------------------------------------------
def test_lateral_pairs_from_label_names():
    from pipeline.transforms import lateral_pairs

    assert lateral_pairs(["background", "brainstem", "spinal_cord", "left_parotid", "right_parotid", "mandible"]) == [(3, 4)]
    assert lateral_pairs(["background", "liver", "kidney_right", "spleen", "kidney_left"]) == [(4, 2)]
    assert lateral_pairs(["bg", "Parotid L", "Parotid R", "Lens-lt", "Lens-rt"]) == [(1, 2), (3, 4)]
    assert lateral_pairs(["background", "anterior", "posterior"]) == []
    assert lateral_pairs(["background", "left_lung", "heart"]) == []  # a side without its partner
    assert lateral_pairs(["bg", "lung", "liver"]) == []  # "l" inside a word is not a side
    assert lateral_pairs(["bg", "RightLung", "LeftLung", "OpticNrv_L", "OpticNrv_R"]) == [(2, 1), (3, 4)]  # camelCase


def test_lateral_flip_swaps_pairs_so_left_stays_left():
    """A left organ (label 1) at low x and a right one (label 2) at high x, RAS axis 0 pointing to
    the patient's right: after the flip the image is mirrored, and the swap keeps label 1 on the
    left (low x), where the flipped image now shows the other organ."""
    from pipeline.transforms import RandLateralFlipd

    label = torch.zeros(1, 10, 4, 3, dtype=torch.uint8)
    label[0, 1:3], label[0, 7:9], label[0, 5, 0, 0] = 1, 2, 3  # 3: a midline label, not a pair
    image = torch.arange(10, dtype=torch.float32).view(1, 10, 1, 1).expand(1, 10, 4, 3).clone()
    weight = torch.rand(1, 10, 4, 3)
    out = RandLateralFlipd(["image", "label", "weight"], pairs=[(1, 2)], prob=1.0)(
        {"image": image, "label": label, "weight": weight})
    assert torch.equal(out["image"], torch.flip(image, [1])) and torch.equal(out["weight"], torch.flip(weight, [1]))
    assert out["label"][0, 1:3].eq(1).all() and out["label"][0, 7:9].eq(2).all()  # left stays left
    assert out["label"][0, 4, 0, 0] == 3 and out["label"].eq(3).sum() == 1  # the midline label only mirrored
    same = RandLateralFlipd(["image", "label"], pairs=[(1, 2)], prob=0.0)({"image": image, "label": label})
    assert torch.equal(same["label"], label) and torch.equal(same["image"], image)
    plain = RandLateralFlipd(["label"], pairs=[], prob=1.0)({"label": label})
    assert torch.equal(plain["label"], torch.flip(label, [1]))  # no pairs: a plain flip


def test_flip_transforms_swap_pairs_along_the_lateral_axis_only():
    from pipeline.transforms import RandLateralFlipd, flip_transforms

    keys = ["image", "label", "weight"]
    lateral = flip_transforms(keys, [0, 1, 2], 0.5, lateral_axis=0, pairs=[[3, 4]])
    assert [type(t) for t in lateral] == [RandLateralFlipd, RandFlipd, RandFlipd]
    assert lateral[0].pairs == [(3, 4)] and lateral[0].spatial_axis == 0 and lateral[0].prob == 0.5
    assert [t.flipper.spatial_axis for t in lateral[1:]] == [1, 2]
    for plain in (flip_transforms(keys, [0, 1], 0.5, lateral_axis=0, pairs=[]),  # no pairs: MONAI's flips
                  flip_transforms(keys, [1, 2], 0.5, lateral_axis=0, pairs=[[3, 4]]),  # no left-right flip
                  flip_transforms(keys, [0, 1], 0.5, lateral_axis=None, pairs=[[3, 4]])):
        assert {type(t) for t in plain} == {RandFlipd}
