"""Fingerprint: per-case statistics, nnU-Net target spacing, suggested overrides, real data, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.errors import InputError
from pipeline.fileio import write_nifti
from pipeline.fingerprint import suggest_roi, target_spacing, write_fingerprint

HIPPOCAMPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "Task04_Hippocampus" / "dataset.json"


def test_synthetic_ct(ct_dataset: Path, tmp_path: Path):
    data = shutil.copytree(ct_dataset.parent, tmp_path / "ct")
    out = write_fingerprint(data / "dataset.json")
    assert out == data / "fingerprint.json"
    fp = json.loads(out.read_text())
    case = fp["cases"][0]
    assert case["spacing"] == [0.8, 0.8, 2.5] and case["shape"] == [32, 32, 12]
    assert sum(case["label_voxels"].values()) == 32 * 32 * 12
    # per-case foreground statistics against a direct computation on the files
    image = nib.load(case["image"]).get_fdata()
    fg = image[np.asanyarray(nib.load(case["label"]).dataobj) > 0]
    assert case["intensity"][0]["mean"] == pytest.approx(fg.mean())
    assert case["intensity"][0]["percentile_99_5"] == pytest.approx(np.percentile(fg, 99.5))
    ds = fp["dataset"]
    assert ds["n_cases"] == 4 and set(ds["classes"]) == {"background", "liver", "kidney", "spleen"}
    assert ds["anisotropy"]["anisotropic"] is False  # 2.5 > 3 x 0.8 but 12 slices are not < 32 / 3
    ct = ds["intensity"]["CT"]
    assert fp["suggested"] == {"pixdim": [0.8, 0.8, 2.5], "roi_size": [32, 32, 16]}
    [norm] = fp["normalisation"]["channels"]  # the CT window segpipe plan writes, from the same percentiles
    assert norm["scheme"] == "ct" and norm["clip"] == [round(ct["percentile_00_5"], 4), round(ct["percentile_99_5"], 4)]


def _aniso_dataset(root: Path) -> Path:
    """3 MR cases stored slice-axis first (file axis 0 -> world S, 4/5/6 mm; 0.7 mm in-plane)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    entries = []
    for i, dz in enumerate([4.0, 5.0, 6.0]):
        affine = np.array([[0, 0.7, 0, -10.0], [0, 0, -0.7, 30.0], [dz, 0, 0, 5.0], [0, 0, 0, 1]])
        label = np.zeros((8, 40, 40), np.uint8)
        label[2:6, 10:30, 10:20] = 1
        label[2:6, 10:30, 20:30] = 2
        write_nifti(label, root / "labelsTr" / f"mr_{i}.nii.gz", affine=affine)
        write_nifti(label.astype(np.float32) * 100 + 7, root / "imagesTr" / f"mr_{i}.nii.gz", affine=affine)
        entries.append({"image": f"./imagesTr/mr_{i}.nii.gz", "label": f"./labelsTr/mr_{i}.nii.gz"})
    manifest = {"name": "aniso", "modality": {"0": "MR"}, "labels": {"0": "background", "1": "a", "2": "b"},
                "training": entries}
    (root / "dataset.json").write_text(json.dumps(manifest))
    return root / "dataset.json"


def test_anisotropic_permuted_axes(tmp_path: Path):
    fp = json.loads(write_fingerprint(_aniso_dataset(tmp_path / "d"), tmp_path / "fp.json").read_text())
    # RAS order: the file's slice axis is the bundle's third axis
    assert [c["spacing"] for c in fp["cases"]] == [[0.7, 0.7, dz] for dz in (4.0, 5.0, 6.0)]
    assert fp["cases"][0]["shape"] == [40, 40, 8]
    assert fp["dataset"]["anisotropy"]["anisotropic"] is True
    # low-res axis: 10th percentile of (4, 5, 6) = 4.2 mm; median 8 slices x 5 mm / 4.2 = 9.5 -> 16
    assert fp["suggested"] == {"pixdim": [0.7, 0.7, 4.2], "roi_size": [40, 40, 16]}
    assert [c["scheme"] for c in fp["normalisation"]["channels"]] == ["zscore_per_image"]
    mr = fp["dataset"]["intensity"]["MR"]
    assert (mr["mean"], mr["std"], mr["percentile_00_5"]) == (pytest.approx(157.0), pytest.approx(50.0), 107.0)
    assert fp["dataset"]["classes"]["a"]["fraction_of_foreground"] == 0.5


def test_image_label_shape_mismatch(tmp_path: Path):
    manifest = _aniso_dataset(tmp_path / "d")
    write_nifti(np.zeros((8, 40, 41), np.uint8), tmp_path / "d" / "labelsTr" / "mr_1.nii.gz", affine=np.eye(4))
    with pytest.raises(InputError, match=r"mr_1.nii.gz shape \(8, 40, 41\)"):  # validate's line
        write_fingerprint(manifest)
    with pytest.raises(InputError, match=r"mr_1.nii.gz: shape \(8, 40, 41\) differs"):  # its own, unvalidated
        write_fingerprint(manifest, validate=False)


def test_target_spacing_rule():
    shapes = np.array([[100, 100, 20]] * 5)
    # isotropic enough: the median
    assert target_spacing(np.array([[1, 1, 2.5]] * 5, float), shapes) == ([1.0, 1.0, 2.5], False)
    # anisotropic, but the 10th percentile (0.5) is finer than in-plane: in-plane spacing + 1e-5
    spacings = np.array([[1, 1, 4], [1, 1, 4], [1, 1, 4], [1, 1, 0.5], [1, 1, 0.5]], float)
    assert target_spacing(spacings, shapes)[0] == pytest.approx([1.0, 1.0, 1.00001])
    assert suggest_roi([200.0, 30.0, 12.0]) == ([128, 32, 16], 16)
    assert suggest_roi([35.0, 50.5, 36.0]) == ([40, 56, 40], 8)


@pytest.mark.realdata
@pytest.mark.skipif(not HIPPOCAMPUS.is_file(), reason="no ../shared/data/Task04_Hippocampus")
def test_hippocampus(tmp_path: Path):
    fp = json.loads(write_fingerprint(HIPPOCAMPUS, tmp_path / "fp.json").read_text())
    n = len(json.loads(HIPPOCAMPUS.read_text())["training"])
    assert fp["dataset"]["n_cases"] == n
    assert fp["dataset"]["spacing"]["median"] == [1.0, 1.0, 1.0]
    assert [c["scheme"] for c in fp["normalisation"]["channels"]] == ["zscore_per_image"]
    roi = fp["suggested"]["roi_size"]
    assert all(r % 8 == 0 and r >= s for r, s in zip(roi, fp["dataset"]["shape"]["median"], strict=True))


def test_cli(ct_dataset: Path, tmp_path: Path):
    cmd = [sys.executable, "-m", "pipeline", "fingerprint"]
    ok = subprocess.run(cmd + [str(ct_dataset), "--out", str(tmp_path / "fp.json")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "suggested pixdim: [0.8, 0.8, 2.5]" in ok.stdout and (tmp_path / "fp.json").is_file()
    assert "normalisation segpipe plan writes: channel 0 'CT' (CT): clip to the foreground" in ok.stdout
    assert "a_min" not in ok.stdout and "normalization" not in ok.stdout
    bad = subprocess.run(cmd + [str(tmp_path / "none.json")], capture_output=True, text=True)
    assert bad.returncode == 1 and "no such manifest" in bad.stderr


def test_one_file_per_channel_and_4d_images_fingerprint_alike(tmp_path: Path):
    from pipeline.synthetic import write_dataset

    fps = {}
    for layout in ("4d", "files"):
        m = write_dataset("mr2ch", 2, tmp_path / layout, seed=0, shape=(24, 24, 6), channel_layout=layout)
        fps[layout] = json.loads(write_fingerprint(m).read_text())
    a, b = fps["4d"], fps["files"]
    assert [c["intensity"] for c in a["cases"]] == [c["intensity"] for c in b["cases"]]
    assert len(a["cases"][0]["intensity"]) == 2 and isinstance(b["cases"][0]["image"], list)
    assert a["dataset"]["channels"] == b["dataset"]["channels"]
    assert [c["name"] for c in a["dataset"]["channels"]] == ["T1", "T2"]


def test_label_objects_count_components_and_ignore_specks():
    from pipeline.fingerprint import label_objects

    label = np.zeros((30, 30, 10), np.uint8)
    label[2:8, 2:8, 2:8] = 1
    label[20:26, 20:26, 2:8] = 1  # a second object of class 1
    label[15, 15, 5] = 1  # a one-voxel speck: < 5% of the largest component
    label[10:14, 2:6, 2:6] = 2
    assert label_objects(label) == {"1": 2, "2": 1}


def _two_d(root: Path, image_shape: tuple[int, ...], label_shape: tuple[int, ...], channels: int = 1) -> Path:
    """5 cases of one 2D image layout (an LPS affine, 0.5 mm in-plane) and a manifest for them."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([-0.5, -0.5, 1.0, 1.0])
    label = np.zeros((16, 16), np.uint8)
    label[4:10, 5:12] = 1
    for i in range(5):
        image = np.broadcast_to((label * 50.0 + i)[:, :, None], (16, 16, channels)).astype(np.float32)
        write_nifti(image.reshape(image_shape), root / "imagesTr" / f"c{i}.nii.gz", affine=affine)
        write_nifti(label.reshape(label_shape), root / "labelsTr" / f"c{i}.nii.gz", affine=affine)
    doc = {"name": "2d", "modality": {str(c): "MR" for c in range(channels)}, "labels": {"0": "bg", "1": "a"},
           "tensorImageSize": "3D" if len(image_shape) == 4 else "2D",  # what validate needs for each layout
           "training": [{"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"} for i in range(5)]}
    (root / "dataset.json").write_text(json.dumps(doc))
    return root / "dataset.json"


def test_single_slice_volumes_keep_their_third_axis_as_the_loader_does(tmp_path: Path):
    """MONAI reads a NIfTI's first three axes as spatial: (X, Y, 1) and (X, Y, 1, C) are volumes one
    voxel thick in training, so the fingerprint (and the plan) must see them so; (X, Y) stays 2D."""
    for name, image, channels in (("xy1", (16, 16, 1), 1), ("xy1c", (16, 16, 1, 2), 2), ("xy", (16, 16), 1)):
        label = (16, 16, 1) if len(image) > 2 else (16, 16)
        fp = json.loads(write_fingerprint(_two_d(tmp_path / name, image, label, channels)).read_text())
        assert fp["cases"][0]["shape"] == list(label) and len(fp["cases"][0]["spacing"]) == len(label), name
        assert len(fp["cases"][0]["intensity"]) == channels


@pytest.mark.parametrize("image, label, text", [
    ((16, 16, 2), (16, 16), r"c0.nii.gz: shape \(16, 16, 2\) is read as a 3D volume of 2 slices .* "
                            r"on a fourth axis, \(16, 16, 1, 2\), or one file per channel"),
    ((16, 16, 1), (16, 16), r"labelsTr/c0.nii.gz: read with 2 spatial axes, its image .* with 3: store both alike"),
    ((16, 16), (16, 16, 1), r"labelsTr/c0.nii.gz: read with 3 spatial axes, its image .* with 2: store both alike"),
], ids=["xyc", "xy1-image-xy-label", "xy-image-xy1-label"])
def test_2d_layouts_the_loader_cannot_train_are_one_line(tmp_path: Path, image, label, text: str):
    channels = image[-1] if len(image) == 3 and image[-1] > 1 else 1
    with pytest.raises(InputError, match=text) as e:
        write_fingerprint(_two_d(tmp_path, image, label, channels))
    assert "\n" not in str(e.value)


# -- the data are checked as validate checks them; the suggestions are true ------------------------------

ROOT = Path(__file__).resolve().parents[1]
CT_AFFINE = np.diag([-0.8, -0.8, 2.5, 1.0])


def _small_ct(root: Path, defect: str | None = None) -> tuple[Path, Path]:
    """5 tiny CT cases (12x12x4, 0.8x0.8x2.5 mm) and their manifest; ``defect`` spoils case 0. Returns
    (manifest, the spoilt file)."""
    for i in range(5):
        label = np.zeros((12, 12, 4), np.int16)
        label[3:8, 3:8, 1:3] = 1
        image = label.astype(np.float32) * 100 + i
        label_affine = CT_AFFINE.copy()
        if i == 0 and defect in ("label_7", "label_minus_1"):
            label[0, 0, 0] = 7 if defect == "label_7" else -1
        if i == 0 and defect == "label_moved_50mm":
            label_affine[0, 3] += 50.0
        if i == 0 and defect == "image_4d":
            image = np.stack([image, image], axis=-1)
        write_nifti(image, root / "imagesTr" / f"c{i}.nii.gz", affine=CT_AFFINE)
        write_nifti(label, root / "labelsTr" / f"c{i}.nii.gz", affine=label_affine)
    doc = {"name": "small", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "organ"},
           "training": [{"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"} for i in range(5)]}
    (root / "dataset.json").write_text(json.dumps(doc))
    spoilt = root / ("imagesTr" if defect == "image_4d" else "labelsTr") / "c0.nii.gz"
    return root / "dataset.json", spoilt


REFUSED = {"label_7": "label values [7] not declared", "label_minus_1": "label values [-1] not declared",
           "label_moved_50mm": "affines differ (by up to 50 mm)", "image_4d": "4D image (12, 12, 4, 2) where 3D"}


@pytest.mark.parametrize("defect", REFUSED)
def test_data_validate_refuses_are_refused_in_one_line_naming_the_file_and_nothing_is_written(tmp_path: Path,
                                                                                             defect: str):
    from pipeline.validation import validate_manifest

    manifest, spoilt = _small_ct(tmp_path, defect)
    [problem] = validate_manifest(manifest)
    with pytest.raises(InputError) as e:
        write_fingerprint(manifest)
    assert problem in str(e.value) and str(spoilt) in str(e.value) and REFUSED[defect] in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "fingerprint.json").exists()


def test_cli_refuses_bad_data_with_one_error_line_and_exit_1(tmp_path: Path):
    manifest, spoilt = _small_ct(tmp_path, "label_7")
    r = subprocess.run([sys.executable, "-m", "pipeline", "fingerprint", str(manifest)], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    [line] = [ln for ln in r.stderr.splitlines() if str(spoilt) in ln]
    assert line.startswith("segpipe fingerprint: error: ") and "label values [7] not declared" in line
    assert not (tmp_path / "fingerprint.json").exists()


def test_differing_channel_counts_name_the_file_even_unvalidated(tmp_path: Path):
    manifest, spoilt = _small_ct(tmp_path, "image_4d")
    with pytest.raises(InputError, match=rf"^{tmp_path / 'imagesTr' / 'c1.nii.gz'}: 1 channel\(s\), but "
                                         rf"{spoilt} has 2"):
        write_fingerprint(manifest, validate=False)
    assert not (tmp_path / "fingerprint.json").exists()


def test_suggested_ids_exist_in_every_bundle_and_the_normalisation_is_the_plans(ct6_dataset: Path, tmp_path: Path):
    from pipeline.bundle import load_bundle
    from pipeline.plan import make_plan

    fp = json.loads(write_fingerprint(ct6_dataset, tmp_path / "fp.json").read_text())
    assert set(fp["suggested"]) == {"pixdim", "roi_size"}
    for common in sorted((ROOT / "bundles").glob("*/configs/common.json")):  # an unknown id is a UsageError
        load_bundle(common.parents[1], ("common.json",), overrides=fp["suggested"])
    plan = make_plan(fp, json.loads(ct6_dataset.read_text()), "cpu", 30)
    assert fp["normalisation"]["channels"] == plan["normalisation"]["channels"]
    assert fp["normalisation"]["rationale"] == plan["rationale"]["normalisation"]


def test_a_median_shape_a_float32_spacing_puts_a_hair_over_a_multiple_is_not_rounded_a_step_up():
    """48 voxels at 0.8 mm (float32: 0.800000011) came out as 48.0000007 voxels at the target
    spacing, and the suggested patch was 56 where plan chose 48 (E2E audit)."""
    from pipeline.fingerprint import suggest_roi

    assert suggest_roi([48.0000007, 48.0000007, 16.0000003])[0] == [48, 48, 16]
    assert suggest_roi([48.01, 47.0, 15.2])[0] == [56, 48, 16]
