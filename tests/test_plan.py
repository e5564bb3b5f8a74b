"""Planning rules (pipeline.plan) on fingerprints built in memory: one or more tests per rule.

Fingerprints are made by the fingerprint module's own ``dataset_fingerprint`` from constructed
per-case records and small intensity samples, so they have exactly the fields ``fingerprint.json``
has; no files are read.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai import transforms as mt
from monai.networks.nets import DynUNet

from pipeline import plan as P
from pipeline.errors import InputError, UsageError
from pipeline.fingerprint import dataset_fingerprint, intensity_stats, target_spacing

HIPPO_MANIFEST = {"name": "Hippocampus", "tensorImageSize": "3D", "modality": {"0": "MRI"},
                  "labels": {"0": "background", "1": "Anterior", "2": "Posterior"}}
# four shapes whose medians are the real Task04 fingerprint's (35, 50.5, 36), cycled over 208 cases
HIPPO_SHAPES = [[34, 50, 35], [35, 50, 36], [35, 51, 36], [36, 52, 37]]


def make_fp(spacings: list, shapes: list, manifest: dict, voxels: list[dict] | None = None,
            means: list[float] | None = None, seed: int = 0) -> dict:
    """A fingerprint dict of ``len(shapes)`` cases (spacings cycled); 1% of each image per foreground
    class unless ``voxels`` gives label_voxels per case (cycled); channel c's foreground intensities
    are N(means[c], 100)."""
    rng = np.random.default_rng(seed)
    n_ch = len(manifest["modality"])
    means = means or [100.0 * (c + 1) for c in range(n_ch)]
    cases, samples = [], []
    for i, shape in enumerate(shapes):
        s = [rng.normal(means[c], 100.0, 300) for c in range(n_ch)]
        n = int(np.prod(shape))
        lv = (dict(voxels[i % len(voxels)]) if voxels
              else {str(k): n // 100 for k in range(1, len(manifest["labels"]))})
        lv["0"] = n - sum(lv.values())
        cases.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz",
                      "spacing": list(spacings[i % len(spacings)]), "shape": list(shape),
                      "foreground_fraction": 1 - lv["0"] / n,
                      "intensity": [intensity_stats(x) for x in s], "label_voxels": lv})
        samples.append(s)
    return {"manifest": "dataset.json", **dataset_fingerprint(cases, samples, manifest), "cases": cases}


@pytest.fixture(scope="module")
def hippo() -> dict:
    """The hippocampus numbers: 208 cases at 1 mm, median shape 35x50.5x36, classes of 1730/1590 voxels."""
    return make_fp([[1.0, 1.0, 1.0]], HIPPO_SHAPES * 52, HIPPO_MANIFEST, voxels=[{"1": 1730, "2": 1590}])


def forward_shape(plan: dict, train: bool = False) -> tuple[int, ...]:
    """Output shape of a real MONAI DynUNet built from the plan, for one patch of roi_size."""
    n = plan["network"]
    net = DynUNet(n["spatial_dims"], n["in_channels"], n["out_channels"], kernel_size=n["kernel_size"],
                  strides=n["strides"], upsample_kernel_size=n["upsample_kernel_size"], filters=n["filters"],
                  deep_supervision=n["deep_supervision"], deep_supr_num=n["deep_supr_num"],
                  res_block=n["res_block"])
    net.train(train)
    with torch.no_grad():
        return tuple(net(torch.zeros(1, n["in_channels"], *plan["patch"]["roi_size"])).shape)


# -- the CPU reference: the shipped hippocampus bundle -------------------------------------------------

def test_hippocampus_cpu_plan_is_the_shipped_recipe(hippo: dict):
    plan = P.make_plan(hippo, HIPPO_MANIFEST, "cpu", 30)
    # bundles/hippocampus_mri_3d: pixdim 1 mm, roi 40x56x40, DynUNet plain blocks, batch 2,
    # deep_supr_num 2, per-image z-score, AdamW 2e-3, validation every 6 epochs, margin 0, flip TTA;
    # 16 wide as planned up to 0.7.x. 0.8.0 departs in width alone: 24 wide, measured better where
    # native bf16 buys 32 epochs in the budget (BENCHMARKS "Network width"); the planner cannot know that
    assert plan["name"] == "hippocampus_mri_3d" and plan["spatial_dims"] == 3 and plan["slice_axis"] is None
    assert plan["spacing"]["pixdim"] == [1.0, 1.0, 1.0] and plan["spacing"]["anisotropic"] is False
    assert plan["patch"]["roi_size"] == [40, 56, 40]
    net = plan["network"]
    assert net["filters"] == [16, 32, 64, 128] and net["res_block"] is False
    assert net["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 3 and net["kernel_size"] == [[3, 3, 3]] * 4
    assert net["deep_supervision"] and net["deep_supr_num"] == 2
    assert plan["sampling"]["batch_size"] == 2
    assert plan["normalisation"]["transforms"] == [
        {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": False, "channel_wise": True}]
    s = plan["schedule"]
    assert (s["optimizer"], s["learning_rate"], s["time_budget_min"]) == ("AdamW", 2e-3, 30.0)
    assert s["val_interval"] == 6
    assert plan["inference"]["roi_size"] == [40, 56, 40] and plan["inference"]["margin"] == 0
    assert plan["labels"] == ["background", "Anterior", "Posterior"] and plan["out_channels"] == 3
    assert plan["channels"] == [{"index": 0, "name": "MRI", "modality": "other"}] and plan["in_channels"] == 1
    # training mode: the main output and 2 deep-supervision heads, each at the patch's shape
    assert forward_shape(plan, train=True) == (1, 3, 3, 40, 56, 40)


def test_hippocampus_cuda_plan_is_nnunet_like(hippo: dict):
    plan = P.make_plan(hippo, HIPPO_MANIFEST, "cuda", 30)
    assert plan["patch"]["roi_size"] == [40, 56, 40] and plan["network"]["filters"] == [32, 64, 128, 256]
    # the budget would allow 46 patches; 5% of the dataset's voxels: 0.05 * 63630 * 208 / 89600 = 7.4
    assert plan["sampling"]["batch_size"] == 7
    assert plan["augmentation"]["gamma_prob"] > 0  # nnU-Net's intensity augmentation on a GPU


# -- rule 1: target spacing ------------------------------------------------------------------------------

def test_target_spacing_reuses_the_fingerprint_rule():
    spacings = [[0.7, 0.7, z] for z in (3.0, 4.0, 5.0, 5.0, 6.0)]
    fp = make_fp(spacings, [[200, 200, 30]] * 5, {**HIPPO_MANIFEST, "modality": {"0": "MR"}})
    target, aniso, median_shape, why = P.target_spacing(fp)
    expected, _ = target_spacing(np.array(spacings), np.array([[200, 200, 30]] * 5, float))
    assert aniso and target == expected and target[2] == pytest.approx(np.percentile([3, 4, 5, 5, 6], 10))
    assert median_shape[2] == pytest.approx(np.median([30 * z / target[2] for z in (3, 4, 5, 5, 6)]), abs=1e-3)
    assert "10th percentile" in why and "3.4 mm" in why
    plan = P.make_plan(fp, {**HIPPO_MANIFEST, "modality": {"0": "MR"}}, "cpu", 30)
    assert plan["spacing"]["pixdim"] == [0.7, 0.7, 3.4]


def test_spacings_differing_tenfold_warn_and_plan_for_the_median(caplog: pytest.LogCaptureFixture):
    fp = make_fp([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 12.0]], [[64, 64, 64]] * 5, HIPPO_MANIFEST)
    with caplog.at_level(logging.WARNING, logger="pipeline.plan"):
        plan = P.make_plan(fp, HIPPO_MANIFEST, "cpu", 30)
    assert plan["spacing"]["pixdim"] == [1.0, 1.0, 1.0]
    assert any("12-fold" in w and "axis 2" in w for w in plan["warnings"]) and "12-fold" in caplog.text


# -- rules 2-3: patch size and topology --------------------------------------------------------------------

@pytest.mark.parametrize("device, cap", [("cpu", 2**17), ("cuda", 128**3)])
def test_patch_fits_the_device_budget_and_keeps_the_aspect_ratio(device: str, cap: int):
    median = [400.0, 200.0, 100.0]
    topo, why = P.patch_and_topology([1.0, 1.0, 1.0], median, device, 100)
    roi, pools = topo["roi_size"], topo["pools_per_axis"]
    assert np.prod(roi) <= cap and np.prod(roi) > cap / 3  # shrunk, but not further than needed
    assert all(r % 2**p == 0 and r / 2**p >= P.MIN_FEATURE_MAP for r, p in zip(roi, pools, strict=True))
    ratios = np.array(roi) / np.array(median)  # the axis largest relative to the median shrinks first
    assert ratios.max() / ratios.min() < 1.5 and roi[0] > roi[1] > roi[2]
    assert "shrunk" in why and str(cap * 2) in why


def test_small_images_keep_the_median_shape_padded_to_the_pooling_divisor():
    topo, _ = P.patch_and_topology([1.0, 1.0, 1.0], [35.0, 50.5, 36.0], "cpu", 208)
    assert topo["roi_size"] == [40, 56, 40] and topo["pools_per_axis"] == [3, 3, 3]  # 35 -> 18 -> 9 -> 5 < 8


def test_anisotropic_topology_pools_fine_axes_first_with_kernel_1_along_the_coarse_axis():
    topo, _ = P.patch_and_topology([0.7, 0.7, 3.0], [40.0, 40.0, 10.0], "cpu", 50)
    net = topo["network"]
    # 0.7 -> 1.4 -> 2.8 mm in-plane before the 3 mm axis is within 2x of the finest and pools too
    assert net["strides"] == [[1, 1, 1], [2, 2, 1], [2, 2, 1], [2, 2, 2]] and topo["roi_size"] == [40, 40, 10]
    assert net["kernel_size"] == [[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3]]
    assert net["upsample_kernel_size"] == net["strides"][1:]
    plan = {"network": {**net, "in_channels": 1, "out_channels": 2}, "patch": topo}
    assert forward_shape(plan) == (1, 2, *topo["roi_size"])


def test_pool_and_conv_is_nnunets_rule():
    npool, strides, kernels, patch, div = P.pool_and_conv([1.0, 1.0, 4.0], [100.0, 100.0, 20.0])
    # x/y pool alone (1 -> 2 -> 4 mm) until they match z; then each axis pools while it has >= 8 voxels
    assert strides == [[1, 1, 1], [2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]]
    assert kernels == [[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    assert npool == [4, 4, 2] and div == [16, 16, 4] and patch == [112, 112, 20]


# -- rule 4: width and batch -----------------------------------------------------------------------------

def test_features_double_from_16_on_cpu_and_32_on_cuda_capped_per_dimension():
    cuda3d = P.patch_and_topology([1.0, 1.0, 1.0], [300.0] * 3, "cuda", 100)[0]["network"]["filters"]
    assert cuda3d == [32, 64, 128, 256, 320, 320]
    cuda2d = P.patch_and_topology([0.5, 0.5], [1024.0, 1024.0], "cuda", 100)[0]["network"]["filters"]
    assert cuda2d[:5] == [32, 64, 128, 256, 512] and max(cuda2d) == 512
    cpu3d = P.patch_and_topology([1.0, 1.0, 1.0], [300.0] * 3, "cpu", 100)[0]["network"]["filters"]
    assert cpu3d[0] == 16 and all(b == 2 * a for a, b in zip(cpu3d, cpu3d[1:], strict=False))


def test_batch_size_from_the_budget_capped_at_5_percent_of_the_data_and_at_least_2():
    many = P.patch_and_topology([0.5, 0.5], [64.0, 64.0], "cpu", 100_000)[0]
    assert many["batch_size"] == P.ITERATION_VOXELS[("cpu", 2)] // (64 * 64)  # budget-bound: 192
    few = P.patch_and_topology([0.5, 0.5], [64.0, 64.0], "cpu", 100)[0]
    assert few["batch_size"] == 5  # 5% of 100 images of 64x64
    tiny = P.patch_and_topology([0.5, 0.5], [64.0, 64.0], "cpu", 4)[0]
    assert tiny["batch_size"] == 2


# -- rule 5: 2D plans ------------------------------------------------------------------------------------

def test_2d_dataset_gets_a_2d_plan():
    manifest = {"name": "Cells", "tensorImageSize": "2D", "modality": {"0": "microscopy"},
                "labels": {"0": "background", "1": "cell"}}
    fp = make_fp([[0.5, 0.5]], [[64, 64], [64, 72], [60, 64]] * 4, manifest)
    plan = P.make_plan(fp, manifest, "cpu", 10)
    assert plan["spatial_dims"] == 2 and plan["slice_axis"] is None
    assert plan["spacing"]["pixdim"] == [0.5, 0.5]
    assert plan["patch"]["roi_size"] == [64, 64] and plan["network"]["strides"][0] == [1, 1]
    assert plan["augmentation"]["rotate_range"] == [round(math.pi, 4)]
    assert plan["augmentation"]["flip_axes"] == [0, 1]
    assert plan["loss"]["border_on"] == "background"  # one foreground class: the paper's setting
    assert forward_shape(plan) == (1, 2, 64, 64)


def test_too_anisotropic_for_3d_gets_2d_slices_across_the_coarse_axis():
    fp = make_fp([[0.7, 0.7, 8.0]], [[200, 200, 6]] * 5, HIPPO_MANIFEST)
    plan = P.make_plan(fp, HIPPO_MANIFEST, "cpu", 30)
    assert plan["spatial_dims"] == 2 and plan["slice_axis"] == 2 and plan["network"]["spatial_dims"] == 2
    assert plan["spacing"]["pixdim"] == [0.7, 0.7, 0.0]  # Spacingd keeps the slice spacing
    assert plan["patch"]["crop_size"] == [*plan["patch"]["roi_size"], 1]
    assert plan["inference"]["inferer"] == "SliceTileInferer" and plan["inference"]["slice_axis"] == 2
    assert "too few to pool once" in plan["rationale"]["dimensionality"]


def test_single_slice_volumes_are_2d_and_a_2d_manifest_with_3d_cases_is_refused():
    fp = make_fp([[1.0, 1.0, 1.0]], [[64, 64, 1]] * 5, HIPPO_MANIFEST)
    plan = P.make_plan(fp, HIPPO_MANIFEST, "cpu", 30)
    assert plan["spatial_dims"] == 2 and plan["slice_axis"] == 2 and plan["patch"]["roi_size"] == [64, 64]
    fp3 = make_fp([[1.0, 1.0, 1.0]], [[64, 64, 64]] * 5, HIPPO_MANIFEST)
    with pytest.raises(InputError, match="tensorImageSize"):
        P.make_plan(fp3, {**HIPPO_MANIFEST, "tensorImageSize": "2D"}, "cpu", 30)


# -- rule 6: normalisation -------------------------------------------------------------------------------

def _apply(specs: list[dict], image: np.ndarray) -> np.ndarray:
    ops = [getattr(mt, s["_target_"])(**{k: v for k, v in s.items() if k != "_target_"}) for s in specs]
    return np.asarray(mt.Compose(ops)({"image": torch.as_tensor(image)})["image"])


def test_ct_is_clipped_to_foreground_percentiles_then_z_scored_with_foreground_statistics():
    manifest = {**HIPPO_MANIFEST, "modality": {"0": "CT"}}
    fp = make_fp([[1.0, 1.0, 1.0]], [[32, 32, 32]] * 5, manifest, means=[40.0])
    plan = P.make_plan(fp, manifest, "cpu", 30)
    st = fp["dataset"]["intensity"]["CT"]
    (spec,) = plan["normalisation"]["transforms"]
    assert spec["_target_"] == "ScaleIntensityRanged" and spec["clip"] is True
    assert [spec["a_min"], spec["a_max"]] == [round(st[k], 4) for k in ("percentile_00_5", "percentile_99_5")]
    image = np.random.default_rng(1).normal(40, 400, (1, 8, 8, 8)).astype(np.float32)
    expected = (np.clip(image, st["percentile_00_5"], st["percentile_99_5"]) - st["mean"]) / st["std"]
    out = _apply(plan["normalisation"]["transforms"], image)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    assert "-" in plan["rationale"]["normalisation"] and "0.5/99.5" in plan["rationale"]["normalisation"]


def test_mr_channels_get_per_image_z_score_each():
    manifest = {**HIPPO_MANIFEST, "modality": {"0": "T1", "1": "T2"}}
    plan = P.make_plan(make_fp([[1.0, 1.0, 1.0]], [[32, 32, 32]] * 5, manifest), manifest, "cpu", 30)
    assert [c["scheme"] for c in plan["normalisation"]["channels"]] == ["zscore_per_image"] * 2
    out = _apply(plan["normalisation"]["transforms"], np.random.default_rng(2).normal(7, 3, (2, 6, 6, 6)))
    np.testing.assert_allclose(out.reshape(2, -1).mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(out.reshape(2, -1).std(1), 1, atol=1e-4)


def test_mixed_channels_get_one_scheme_each():
    manifest = {**HIPPO_MANIFEST, "modality": {"0": "CT", "1": "PET"}}
    fp = make_fp([[1.0, 1.0, 1.0]], [[32, 32, 32]] * 5, manifest, means=[40.0, 5.0])
    plan = P.make_plan(fp, manifest, "cpu", 30)
    assert [c["scheme"] for c in plan["normalisation"]["channels"]] == ["ct", "zscore_per_image"]
    image = np.random.default_rng(3).normal(40, 400, (2, 6, 6, 6)).astype(np.float32)
    out = _apply(plan["normalisation"]["transforms"], image)
    st = fp["dataset"]["intensity"]["CT"]
    assert out.shape == image.shape
    expected = (np.clip(image[0], st["percentile_00_5"], st["percentile_99_5"]) - st["mean"]) / st["std"]
    np.testing.assert_allclose(out[0], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose([out[1].mean(), out[1].std()], [0, 1], atol=1e-4)


# -- rule 7: the boundary-weighted loss's sigma -------------------------------------------------------------

def test_sigma_is_a_tenth_of_the_smallest_class_diameter(hippo: dict):
    plan = P.make_plan(hippo, HIPPO_MANIFEST, "cpu", 30)
    d = (6 * 1590 / math.pi) ** (1 / 3)  # Posterior: 1590 voxels of 1 mm^3 -> 14.5 mm sphere
    assert plan["loss"]["sigma_mm"] == pytest.approx(0.1 * d, abs=1e-3) and plan["loss"]["w0"] == 10.0
    assert plan["loss"]["border_on"] == "all" and "Posterior" in plan["rationale"]["loss"]


def test_sigma_is_clamped_to_1_and_5_voxels_and_uses_object_counts():
    assert P.loss_sigma({"tiny": 2.0}, [0.8, 0.8, 2.0])[0] == 0.8
    assert P.loss_sigma({"liver": 150.0}, [0.8, 0.8, 2.0])[0] == 4.0
    assert P.loss_sigma({}, [1.0, 1.0])[0] == 5.0
    cases = [{"spacing": [0.5, 0.5], "label_voxels": {"1": 4000}, "label_objects": {"1": 10}}]
    (d,) = P.object_diameters(cases, ["background", "cell"]).values()
    assert d == pytest.approx(math.sqrt(4 * 400 * 0.25 / math.pi))  # 10 cells of 400 pixels


# -- rule 8: sampling and augmentation -------------------------------------------------------------------

def test_a_third_of_patches_are_centred_on_foreground(hippo: dict):
    assert P.make_plan(hippo, HIPPO_MANIFEST, "cpu", 30)["sampling"]["pos_neg"] == [1, 2]


@pytest.mark.parametrize("names, sided, flips, pairs", [
    (["background", "liver", "spleen"], {}, [0, 1, 2], []),
    (["background", "left_parotid", "right_parotid"], {0: ["left_parotid", "right_parotid"]}, [0, 1, 2], [[1, 2]]),
    (["background", "Lung_L", "Lung_R"], {0: ["Lung_L", "Lung_R"]}, [0, 1, 2], [[1, 2]]),
    (["background", "RightKidney", "LeftKidney"], {0: ["RightKidney", "LeftKidney"]}, [0, 1, 2], [[2, 1]]),
    (["background", "LeftKidney"], {0: ["LeftKidney"]}, [1, 2], []),
    (["background", "LKidney", "RKidney"], {0: ["LKidney", "RKidney"]}, [0, 1, 2], [[1, 2]]),  # capital side letter
    (["background", "leftkidney", "rightkidney"], {0: ["leftkidney", "rightkidney"]}, [0, 1, 2], [[1, 2]]),
    (["background", "cleft_palate", "liver"], {}, [0, 1, 2], []),  # "cleft" and "liver" are not sides
    (["background", "Post-op cavity", "edema"], {}, [0, 1, 2], []),  # brain tumour data: no posterior here
    (["background", "Anterior", "Posterior"], {1: ["Anterior", "Posterior"]}, [0, 2], []),
    (["background", "superior vena cava"], {2: ["superior vena cava"]}, [0, 1], []),
    (["background", "Liver", "RK", "RAG", "LAG", "LK"], {}, [0, 1, 2], [[4, 3], [5, 2]]),  # FLARE: one letter
    (["background", "rkid", "lkid", "rad", "lad"], {}, [0, 1, 2], [[2, 1], [4, 3]]),  # BTCV
    (["background", "Lung", "RML"], {}, [0, 1, 2], []),  # no counterpart: no side
])
def test_sided_labels_forbid_their_axis_but_left_right_pairs_flip_with_a_swap(names, sided, flips, pairs):
    assert P.sided_axes(names) == sided
    aug, why = P.augmentation(names, 3, None, None, [64, 64, 64], "cpu")
    assert aug["flip_axes"] == flips and aug["lateral_pairs"] == pairs and aug["lateral_axis"] == 0
    assert ("swaps the lateral pairs" in why) == bool(pairs)


def test_a_one_letter_side_needs_the_counterpart_with_the_other_letter():
    from pipeline.laterality import lateral_pairs

    assert lateral_pairs(["background", "LK", "RK", "liver"]) == [(1, 2)]
    assert lateral_pairs(["background", "Lung", "liver", "rectum", "LK"]) == []  # no partner: no side
    assert lateral_pairs(["background", "LUL", "LLL", "RUL", "RML", "RLL"]) == [(1, 3), (2, 5)]
    assert lateral_pairs(["background", "L1", "R1"]) == []  # vertebra L1: the rest must start with a letter
    assert lateral_pairs(["background", "left_lk", "rk", "lk"]) == [(3, 2)]  # a side word's label is not a letter's
    assert lateral_pairs(["background", "LK", "RK", "lk"]) == []  # two left kidneys: ambiguous, no pair


@pytest.mark.parametrize("names", [
    ["background", "LV", "RV", "LA", "RA", "myocardium"],  # MM-WHS
    ["background", "RV", "MLV", "LVC"],  # ACDC
    ["background", "left_ventricle", "right_ventricle", "atrium_left", "atrium_right"],
])
def test_heart_chambers_flip_left_right_without_a_swap(names):
    """Left and right chambers are not mirror images: a flipped left ventricle keeps its label, as in
    nnU-Net's plain flip; a swap would call its thick wall the right ventricle's."""
    assert P.sided_axes(names) == {}
    aug, why = P.augmentation(names, 3, None, None, [64, 64, 64], "cpu")
    assert aug["flip_axes"] == [0, 1, 2] and aug["lateral_pairs"] == [] and "swaps" not in why


def test_brain_ventricles_are_mirror_images_and_swap():
    names = ["background", "Left-Lateral-Ventricle", "Right-Lateral-Ventricle", "3rd-Ventricle"]
    aug, _ = P.augmentation(names, 3, None, None, [64, 64, 64], "cpu")
    assert aug["flip_axes"] == [0, 1, 2] and aug["lateral_pairs"] == [[1, 2]]


def test_a_sided_label_without_its_partner_forbids_the_left_right_flip_and_says_so():
    names = ["background", "left_lung", "right_lung", "left_kidney", "heart"]
    aug, why = P.augmentation(names, 3, None, None, [64, 64, 64], "cpu")
    assert aug["flip_axes"] == [1, 2] and aug["lateral_pairs"] == [[1, 2]]  # the lungs pair, the kidney not
    assert "none along RAS axis 0 (left-right): left_kidney has no partner" in why and "swaps" not in why
    declared, why = P.augmentation(names, 3, None, None, [64, 64, 64], "cpu", [(1, 2), (3, 4)], "declared")
    assert declared["flip_axes"] == [0, 1, 2] and "left_lung/right_lung, left_kidney/heart (declared)" in why


def test_no_half_turns_in_a_plane_with_left_and_right_labels():
    """A +-180 deg rotation in a plane holding the left-right axis is a flip of both its axes without
    the swap: a left parotid turned onto the right side, still labelled left. Capped at +-30 deg
    there; kept where the plane does not hold that axis or no label has a side."""
    hn = ["background", "parotid_L", "parotid_R"]
    aniso, why = P.augmentation(hn, 3, None, 2, [64, 64, 16], "cpu")  # 0.5x0.5x5 mm: turns about z
    assert aniso["rotate_range"] == [0.0, 0.0, round(math.radians(30), 4)] and "left labels to the right" in why
    assert P.augmentation(["background", "liver"], 3, None, 2, [64, 64, 16], "cpu")[0]["rotate_range"][2] == \
        round(math.pi, 4)
    axial, _ = P.augmentation(["background", "left lung", "right lung"], 2, 2, None, [64, 64], "cpu")
    assert axial["rotate_range"] == [round(math.radians(30), 4)]  # (x, y) slices hold the left-right axis
    sagittal, _ = P.augmentation(["background", "left lung", "right lung"], 2, 0, None, [64, 64], "cpu")
    assert sagittal["rotate_range"] == [round(math.pi, 4)]  # (y, z) slices: no side within them
    assert P.augmentation(["background", "Anterior", "Posterior"], 3, None, 2, [40, 56, 40], "cpu")[0][
        "rotate_range"][2] == round(math.pi, 4)  # the hippocampus's parts: as measured


def test_flip_axes_of_a_2d_plan_from_3d_data_are_in_the_network_axes():
    unpaired, _ = P.augmentation(["background", "left lung"], 2, 2, None, [64, 64], "cpu")
    assert unpaired["flip_axes"] == [1] and unpaired["lateral_axis"] == 0  # RAS axis 1: the slice's second
    paired, _ = P.augmentation(["background", "left lung", "right lung"], 2, 1, None, [64, 64], "cpu")
    assert paired["flip_axes"] == [0, 1] and paired["lateral_axis"] == 0  # slices (x, z): LR is axis 0
    across, why = P.augmentation(["background", "left lung", "right lung"], 2, 0, None, [64, 64], "cpu")
    assert across["flip_axes"] == [0, 1] and across["lateral_axis"] is None  # (y, z) slices: no LR flip
    assert "slices run across it" in why


HN_MANIFEST = {"name": "OpenKBP", "tensorImageSize": "3D", "modality": {"0": "CT"},
               "labels": {"0": "background", "1": "brainstem", "2": "spinal_cord", "3": "left_parotid",
                          "4": "right_parotid", "5": "mandible"}}


def test_head_and_neck_plan_flips_left_right_swapping_the_parotids_in_training_and_tta():
    fp = make_fp([[3.9, 3.9, 2.5]], [[128, 128, 128]] * 10, HN_MANIFEST)
    plan = P.make_plan(fp, HN_MANIFEST, "cpu", 30)
    aug, inf = plan["augmentation"], plan["inference"]
    assert aug["flip_axes"] == [0, 1, 2]
    assert inf["tta_axes"] == [0]  # 100 windows per case: TTA on the left-right flip only
    assert aug["lateral_pairs"] == inf["lateral_pairs"] == [[3, 4]] and aug["lateral_axis"] == inf["lateral_axis"] == 0
    assert "left_parotid/right_parotid (from the label names)" in plan["rationale"]["augmentation"]
    assert "swaps the probabilities of the lateral pairs [[3, 4]]" in plan["rationale"]["inference"]
    assert json.loads(json.dumps(plan)) == plan


def test_lateral_pairs_declared_in_the_manifest_by_name_or_value():
    manifest = {**HN_MANIFEST, "labels": {"0": "background", "1": "parotid_a", "2": "parotid_b", "3": "Lens L",
                                          "4": "Lens R", "5": "lens_x"}}
    fp = make_fp([[1.0, 1.0, 1.0]], [[64, 64, 64]] * 5, manifest)
    for declared in ([["parotid_a", "parotid_b"]], [[1, 2]], [["1", "2"]]):
        plan = P.make_plan(fp, {**manifest, "lateral_pairs": declared}, "cpu", 30)
        assert plan["augmentation"]["lateral_pairs"] == [[1, 2], [3, 4]]  # declared + found by name
        assert plan["augmentation"]["flip_axes"] == [0, 1, 2]
        assert "declared in the manifest (lateral_pairs) and from the label names" in plan["rationale"]["augmentation"]
    # a declaration wins over the pair found by name that shares a label with it
    plan = P.make_plan(fp, {**manifest, "lateral_pairs": [["Lens L", "lens_x"]]}, "cpu", 30)
    assert plan["augmentation"]["lateral_pairs"] == [[3, 5]]
    assert plan["augmentation"]["flip_axes"] == [1, 2]  # Lens R has lost its partner: no left-right flip
    assert "Lens R has no partner" in plan["rationale"]["augmentation"]


@pytest.mark.parametrize("declared, text", [
    ([["left_parotid", "right_parotd"]], r"lateral_pairs\[0\]: unknown label 'right_parotd' \(labels: 0 background"),
    ([[3, 9]], r"lateral_pairs\[0\]: unknown label 9"),
    ([["left_parotid", "right_parotid"], ["right_parotid", "mandible"]],
     r"lateral_pairs: label 'right_parotid' is in two pairs \(0 and 1\)"),
    ([["background", "mandible"]], r"lateral_pairs\[0\]: label 0 \('background'\) is the background"),
    ([[3, "left_parotid"]], r"lateral_pairs\[0\]: label 'left_parotid' is paired with itself"),
    ([["left_parotid", "right_parotid", "mandible"]], r"lateral_pairs\[0\]: a pair \[left, right\]"),
    ("left_parotid", r"lateral_pairs: a list of \[left, right\] label pairs expected"),
])
def test_a_bad_lateral_pairs_field_is_one_line_naming_the_manifest(declared, text: str):
    fp = make_fp([[1.0, 1.0, 1.0]], [[64, 64, 64]] * 5, HN_MANIFEST)
    manifest = {**HN_MANIFEST, "lateral_pairs": declared, "manifest_path": "/data/hn/dataset.json"}
    with pytest.raises(InputError, match="^/data/hn/dataset.json: " + text) as e:
        P.make_plan(fp, manifest, "cpu", 30)
    assert "\n" not in str(e.value)


def test_anisotropic_3d_data_rotate_in_plane_only():
    fp = make_fp([[0.7, 0.7, 3.0]], [[160, 160, 24]] * 5, HIPPO_MANIFEST)
    plan = P.make_plan(fp, HIPPO_MANIFEST, "cpu", 30)
    aug = plan["augmentation"]
    assert plan["spatial_dims"] == 3 and aug["rotate_range"] == [0.0, 0.0, round(math.pi, 4)]
    assert aug["scale_range"][2] == [0.0, 0.0] and aug["scale_range"][0] == [-0.3, 0.4]
    iso = P.augmentation(["background", "a"], 3, None, None, [64, 64, 64], "cpu")[0]
    assert iso["rotate_range"] == [round(math.radians(30), 4)] * 3 and iso["affine_prob"] == 0.2


# -- rule 9: schedule ------------------------------------------------------------------------------------

def test_schedule_fits_the_budget_with_several_validations(hippo: dict):
    long = P.make_plan(hippo, HIPPO_MANIFEST, "cpu", 30)["schedule"]
    short = P.make_plan(hippo, HIPPO_MANIFEST, "cpu", 6)["schedule"]
    for s in (long, short):
        assert 4 <= s["estimated_epochs"] / s["val_interval"] <= 8
        assert s["max_epochs"] >= 10 * s["estimated_epochs"] and s["lr_schedule"] == "cosine_wall_time"
    assert short["time_budget_min"] == 6.0 and short["val_interval"] < long["val_interval"]


# -- rule 10: inference ----------------------------------------------------------------------------------

def test_inference_window_is_the_patch_with_the_training_flips():
    manifest = {**HIPPO_MANIFEST, "labels": {"0": "bg", "1": "left eye"}}
    plan = P.make_plan(make_fp([[1.0, 1.0, 1.0]], [[300, 300, 300]] * 5, manifest), manifest, "cpu", 30)
    inf = plan["inference"]
    assert inf["roi_size"] == plan["patch"]["roi_size"] and inf["overlap"] == 0.5
    assert plan["augmentation"]["flip_axes"] == [1, 2]
    assert inf["tta_axes"] == [1]  # many windows: one TTA flip (no left-right flip here: a lone 'left' label)
    assert inf["margin"] == "auto"  # the image is larger than the patch
    assert "only: the median image takes" in plan["rationale"]["inference"]


def test_tta_flips_every_training_axis_where_the_median_image_is_one_window():
    manifest = {**HIPPO_MANIFEST, "labels": {"0": "bg", "1": "organ"}}
    plan = P.make_plan(make_fp([[1.0, 1.0, 1.0]], [[40, 48, 40]] * 5, manifest), manifest, "cpu", 30)
    inf = plan["inference"]
    assert inf["tta_axes"] == plan["augmentation"]["flip_axes"] == [0, 1, 2] and inf["margin"] == 0
    assert "the median image is one window, 8 passes" in plan["rationale"]["inference"]


# -- bad input and the plan as a file ---------------------------------------------------------------------

def test_bad_input_is_named(hippo: dict, caplog: pytest.LogCaptureFixture):
    with pytest.raises(InputError, match="labels: values \\[0, 2\\]"):
        P.make_plan(hippo, {**HIPPO_MANIFEST, "labels": {"0": "bg", "2": "b"}}, "cpu", 30)
    bad = json.loads(json.dumps(hippo))
    bad["cases"][1]["intensity"].append(bad["cases"][1]["intensity"][0])
    with pytest.raises(InputError, match=r"cases\[1\]\.intensity: 2 channels"):
        P.make_plan(bad, HIPPO_MANIFEST, "cpu", 30)
    bad = json.loads(json.dumps(hippo))
    bad["cases"][3]["spacing"], bad["cases"][3]["shape"] = [1.0, 1.0], [35, 50]
    with pytest.raises(InputError, match=r"cases\[3\]\.spacing: .*mix of 2D and 3D"):
        P.make_plan(bad, HIPPO_MANIFEST, "cpu", 30)
    bad = json.loads(json.dumps(hippo))
    bad["dataset"]["labels_not_in_manifest"] = ["3"]
    with pytest.raises(InputError, match="the manifest names none"):
        P.make_plan(bad, HIPPO_MANIFEST, "cpu", 30)
    with pytest.raises(InputError, match="missing field 'cases'"):
        P.make_plan({"dataset": hippo["dataset"]}, HIPPO_MANIFEST, "cpu", 30)
    with pytest.raises(UsageError, match="--device"):
        P.make_plan(hippo, HIPPO_MANIFEST, "tpu", 30)
    with pytest.raises(UsageError, match="--budget-min"):
        P.make_plan(hippo, HIPPO_MANIFEST, "cpu", 0)
    absent = json.loads(json.dumps(hippo))
    absent["dataset"]["classes"]["Posterior"]["cases_present"] = 0
    with caplog.at_level(logging.WARNING, logger="pipeline.plan"):
        plan = P.make_plan(absent, HIPPO_MANIFEST, "cpu", 30)
    assert "absent from every label" in plan["warnings"][0] and "Posterior" in caplog.text


def test_plan_is_json_with_a_rationale_per_decision(hippo: dict, tmp_path: Path):
    plan = P.make_plan(hippo, HIPPO_MANIFEST, "cpu", 30)
    out = P.write_plan(plan, tmp_path / "bundle")
    assert out == tmp_path / "bundle" / "plan.json" and json.loads(out.read_text()) == plan
    assert set(plan["rationale"]) == {"spacing", "dimensionality", "patch_network_batch", "normalisation",
                                      "loss", "sampling", "augmentation", "schedule", "inference"}
    assert all(any(ch.isdigit() for ch in why) for why in plan["rationale"].values())
    assert "35.0, 50.5, 36.0" in plan["rationale"]["patch_network_batch"]


# -- phase 2: per-channel statistics, epoch length, compile, small volumes, folds ----------------------

def test_two_ct_channels_with_one_name_get_their_own_statistics():
    manifest = {**HIPPO_MANIFEST, "modality": {"0": "CT", "1": "CT"}}
    fp = make_fp([[1.0, 1.0, 1.0]], [[32, 32, 32]] * 5, manifest, means=[40.0, 400.0])
    plan = P.make_plan(fp, manifest, "cpu", 30)
    first, second = plan["normalisation"]["channels"]
    assert first["scheme"] == second["scheme"] == "ct" and second["mean"] > first["mean"] + 300
    assert [c["name"] for c in fp["dataset"]["channels"]] == ["CT", "CT"]
    assert set(fp["dataset"]["intensity"]) == {"CT", "CT (channel 1)"}


def test_tiny_datasets_get_epochs_of_at_least_50_iterations_and_short_budgets_no_compile(hippo: dict):
    tiny = make_fp([[1.0, 1.0, 1.0]], [[32, 32, 32]] * 8, HIPPO_MANIFEST)
    s = P.make_plan(tiny, HIPPO_MANIFEST, "cpu", 2)["schedule"]
    assert s["epoch_length"] == P.MIN_EPOCH_ITERATIONS and s["drop_last"] and s["compile"] is False
    assert s["estimated_epochs"] / s["val_interval"] >= 2  # a short run validates more than once
    big = P.make_plan(hippo, HIPPO_MANIFEST, "cpu", 30)["schedule"]
    assert big["epoch_length"] is None and big["compile"] is True  # 83 iterations a pass: a pass it is
    bare = P.make_plan(hippo, HIPPO_MANIFEST, "cpu", 30, compiler=False)
    assert bare["schedule"]["compile"] is False and "no C++ compiler" in bare["rationale"]["schedule"]
    assert P.make_plan(hippo, HIPPO_MANIFEST, "cuda", 30, compiler=False)["schedule"]["compile"] is True


def test_volumes_smaller_than_the_patch_are_one_warning_line_naming_a_file(caplog: pytest.LogCaptureFixture):
    fp = make_fp([[1.0, 1.0, 1.0]], [[64, 64, 64], [64, 64, 64], [20, 64, 64], [64, 64, 64], [64, 64, 64]],
                 HIPPO_MANIFEST)
    with caplog.at_level(logging.WARNING, logger="pipeline.plan"):
        plan = P.make_plan(fp, HIPPO_MANIFEST, "cpu", 30)
    [line] = [w for w in plan["warnings"] if "smaller than the patch" in w]
    assert line.startswith("1 of 5 cases") and "img2.nii.gz" in line and "padded" in line


def test_fewer_cases_than_folds_are_refused_and_exact_shapes_are_not_rounded_up():
    with pytest.raises(InputError, match="training: 4 cases, fewer than the 5"):
        P.make_plan(make_fp([[1.0, 1.0, 1.0]], [[32, 32, 32]] * 4, HIPPO_MANIFEST), HIPPO_MANIFEST, "cpu", 30)
    fp = make_fp([[0.8, 0.8, 2.5]], [[48, 48, 16]] * 5, HIPPO_MANIFEST)  # 48 * 0.8 / 0.8 > 48 in floats
    assert P.make_plan(fp, HIPPO_MANIFEST, "cpu", 30)["patch"]["roi_size"] == [48, 48, 16]


def test_large_images_are_validated_less_often_so_validation_stays_a_small_share(hippo: dict):
    heart = make_fp([[1.25, 1.25, 1.37]], [[320, 320, 110]] * 20, HIPPO_MANIFEST)  # MSD Heart-like
    s = P.make_plan(heart, HIPPO_MANIFEST, "cpu", 30)
    assert s["schedule"]["estimated_epochs"] / s["schedule"]["val_interval"] <= 3
    assert "at most 15% of the budget" in s["rationale"]["schedule"]
    assert P.make_plan(hippo, HIPPO_MANIFEST, "cpu", 30)["schedule"]["val_interval"] == 6  # small: 6 validations


def test_eleven_channels_are_named_in_number_order_not_text_order():
    """Channel keys "0".."10" as text sort "10" before "2": the check compares them as a set."""
    cases = [{"spacing": [1.0, 1.0, 1.0], "shape": [8, 8, 8], "intensity": [{}] * 11, "label_voxels": {"1": 5}}] * 5
    fingerprint = {"cases": cases, "dataset": {"classes": {}}}
    manifest = {"labels": {"0": "background", "1": "lesion"}, "channel_names": {str(i): f"MR{i}" for i in range(11)}}
    _, channels, _ = P.check_inputs(fingerprint, manifest)
    assert [c["name"] for c in channels] == [f"MR{i}" for i in range(11)]
    with pytest.raises(InputError, match=r"names channels \['0', '1', '2', .*'9', '10', '11'\], the images have 11"):
        P.check_inputs(fingerprint, {**manifest, "channel_names": {str(i): "MR" for i in range(12)}})


def test_a_constant_ct_channel_and_an_endless_budget_are_one_line():
    ct = [{"index": 0, "name": "CT", "modality": "CT"}]
    flat = {"percentile_00_5": 40.0, "percentile_99_5": 40.0, "mean": 40.0, "std": 0.0}
    with pytest.raises(InputError, match=r"CT channel 'CT' has one intensity over the labelled voxels"):
        P.normalisation(ct, [flat])  # was a ZeroDivisionError: sd 1e-8 rounded to 0
    for budget in (math.inf, -1, 0):
        with pytest.raises(UsageError, match="--budget-min .*: must be a positive number of minutes"):
            P.make_plan({}, {}, "cpu", budget)


def test_nnunet_channel_names_choose_their_normalisation():
    """nnU-Net v2's channel names noNorm, rescale_to_0_1 and rgb_to_0_1 name a scheme: they were
    z-scored per image like any other non-CT channel."""
    from monai.bundle import ConfigParser
    from monai.data import MetaTensor

    names = ["T1", "noNorm", "rescale_to_0_1", "rgb_to_0_1"]
    channels = [{"index": i, "name": n, "modality": "other"} for i, n in enumerate(names)]
    norm, why = P.normalisation(channels, [{}] * 4)
    assert [c["scheme"] for c in norm["channels"]] == ["zscore_per_image", "none", "rescale_0_1", "rgb_0_1"]
    assert "no normalisation (nnU-Net's channel name)" in why
    image = torch.stack([torch.linspace(0, 10, 64), torch.linspace(3, 7, 64), torch.linspace(2, 6, 64),
                         torch.linspace(0, 255, 64)]).reshape(4, 4, 4, 4)
    out = ConfigParser({"t": {"_target_": "Compose", "transforms": norm["transforms"]}}).get_parsed_content("t")(
        {"image": MetaTensor(image.clone())})["image"]  # a loaded image, as in the bundle
    assert abs(float(out[0].mean())) < 1e-5 and torch.equal(out[1], image[1])  # z-scored; left as it is
    assert float(out[2].min()) == 0.0 and float(out[2].max()) == 1.0 and float(out[3].max()) == 1.0
    single, _ = P.normalisation(channels[1:2], [{}])
    assert single["transforms"] == [{"_target_": "Identityd", "keys": "image"}]


def test_plan_says_each_data_error_once(tmp_path: Path):
    """`segpipe plan` on data validate refuses: each problem in one line, said once (the first in
    the error line, the others logged), exit 1, no bundle."""
    import subprocess
    import sys

    from pipeline.fileio import write_nifti

    for i in range(5):
        label = np.zeros((12, 12, 4), np.uint8)
        label[3:8, 3:8, 1:3] = 1 if i > 1 else 7  # cases 0 and 1: a value the manifest does not declare
        write_nifti(label.astype(np.float32), tmp_path / "imagesTr" / f"c{i}.nii.gz", affine=np.eye(4))
        write_nifti(label, tmp_path / "labelsTr" / f"c{i}.nii.gz", affine=np.eye(4))
    (tmp_path / "dataset.json").write_text(json.dumps({
        "name": "bad", "modality": {"0": "MR"}, "labels": {"0": "background", "1": "a"},
        "training": [{"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"} for i in range(5)]}))
    r = subprocess.run([sys.executable, "-m", "pipeline", "plan", str(tmp_path / "dataset.json"), "--out",
                        str(tmp_path / "bundle"), "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 1 and not (tmp_path / "bundle").exists()
    for i in (0, 1):
        assert r.stderr.count(str(tmp_path / "labelsTr" / f"c{i}.nii.gz")) == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"segpipe plan: error: {tmp_path / 'dataset.json'}: "
                                                        "failed validation with 2 problem(s), first: training[0] c0")
