import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from pipeline.errors import InputError, UsageError
from pipeline.synthetic import (
    cells_image,
    ct_phantom,
    draw_anatomy,
    lps_affine,
    mr_phantom,
    patient_index,
    write_dataset,
)


def _entries(manifest: Path) -> list[dict]:
    return json.loads(manifest.read_text())["training"]


def _load(manifest: Path, rel: str) -> nib.Nifti1Image:
    return nib.load(manifest.parent / rel)


def _touches(mask_a: np.ndarray, mask_b: np.ndarray, gap: int = 0) -> bool:
    """True when ``mask_b`` lies within ``gap`` pixels (8-connected) of touching ``mask_a``."""
    ring = np.ones((3,) * mask_a.ndim, bool)
    return bool((ndimage.binary_dilation(mask_a, ring, iterations=gap + 1) & mask_b).any())


def test_cli_writes_msd_layout_with_relative_paths(tmp_path):
    out = tmp_path / "ct"
    r = subprocess.run([sys.executable, "-m", "pipeline", "synth", "--kind", "ct3d", "--n", "4", "--out", str(out),
                        "--shape", "24", "24", "8"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["numTraining"] == 4 and len(manifest["training"]) == 4 and manifest["test"] == []
    assert manifest["modality"] == {"0": "CT"}
    assert manifest["labels"] == {"0": "background", "1": "liver", "2": "kidney", "3": "spleen"}
    for e in manifest["training"]:
        for key in ("image", "label"):
            assert e[key].startswith("./"), e[key]
            assert (out / e[key]).is_file()
        assert nib.load(out / e["image"]).shape == (24, 24, 8)
    assert len(list((out / "imagesTr").iterdir())) == len(list((out / "labelsTr").iterdir())) == 4
    # some patients have two studies
    assert len({e["patient"] for e in manifest["training"]}) == 3


def test_bad_arguments_are_usage_errors(tmp_path):
    with pytest.raises(UsageError):
        write_dataset("ct2d", 2, tmp_path)
    with pytest.raises(UsageError):
        write_dataset("ct3d", 2, tmp_path, shape=(32, 32))
    r = subprocess.run([sys.executable, "-m", "pipeline", "synth", "--kind", "cells2d", "--n", "0",
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(InputError, match="a_file"):
        write_dataset("ct3d", 1, blocker, shape=(16, 16, 4))


def test_deterministic_per_seed_and_prefix_stable(tmp_path, ct_dataset):
    shape = (32, 32, 12)
    again = write_dataset("ct3d", 2, tmp_path / "again", seed=0, shape=shape)
    other = write_dataset("ct3d", 2, tmp_path / "other", seed=1, shape=shape)
    for a, b, c in zip(_entries(ct_dataset)[:2], _entries(again), _entries(other), strict=True):
        for key in ("image", "label"):
            # same (seed, i) -> byte-identical files, whatever n was
            assert (ct_dataset.parent / a[key]).read_bytes() == (again.parent / b[key]).read_bytes()
        assert not np.array_equal(_load(ct_dataset, a["image"]).get_fdata(), _load(other, c["image"]).get_fdata())


def test_patients_every_fifth_case_repeats():
    assert [patient_index(i) for i in range(7)] == [0, 0, 1, 2, 3, 4, 4]


@pytest.mark.parametrize("fixture", ["ct_dataset", "mr_dataset"])
def test_geometry_lps_anisotropic(fixture, request):
    manifest = request.getfixturevalue(fixture)
    for e in _entries(manifest):
        for key in ("image", "label"):
            img = _load(manifest, e[key])
            assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
            np.testing.assert_allclose(img.header.get_zooms(), (0.8, 0.8, 2.5), rtol=1e-6)
            np.testing.assert_allclose(img.affine, lps_affine())
            assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        label = np.asarray(_load(manifest, e["label"]).dataobj)
        assert label.dtype == np.uint8
        assert set(np.unique(label).tolist()) == {0, 1, 2, 3}


def test_ct_intensities_in_hounsfield(ct_dataset):
    for e in _entries(ct_dataset):
        image = np.asarray(_load(ct_dataset, e["image"]).dataobj)
        label = np.asarray(_load(ct_dataset, e["label"]).dataobj)
        assert image.dtype == np.int16
        assert abs(np.median(image[:2, :2]) + 1000) < 30  # corner: air
        core = [ndimage.binary_erosion(label == k, iterations=1) for k in (1, 2, 3)]
        means = [float(image[m].mean()) if m.any() else float(image[label == k].mean())
                 for m, k in zip(core, (1, 2, 3), strict=True)]
        liver, kidney, spleen = means
        assert 45 < liver < 75 and 110 < kidney < 170 and 75 < spleen < 115, means
        assert kidney - spleen > 20 and spleen - liver > 15


def test_liver_and_kidney_touch_in_most_cases():
    shape = (32, 32, 12)
    touching = 0
    for i in range(8):
        _, label = ct_phantom(shape, np.random.default_rng([3, i]))
        touching += _touches(label == 1, label == 2)
    assert touching >= 6
    # and the anatomy says so: without touching, there is a gap
    rng = np.random.default_rng(0)
    anatomy = draw_anatomy(rng, touch_probability=0.0)
    _, label = ct_phantom(shape, rng, anatomy)
    assert not _touches(label == 1, label == 2)


def test_mr_has_bias_field_and_no_hounsfield(mr_dataset):
    manifest = json.loads(mr_dataset.read_text())
    assert manifest["modality"] == {"0": "MR"}
    for e in manifest["training"]:
        image = np.asarray(_load(mr_dataset, e["image"]).dataobj)
        label = np.asarray(_load(mr_dataset, e["label"]).dataobj)
        assert image.dtype == np.float32 and image.min() >= 0 and 100 < image.max() < 1000
        liver = ndimage.binary_erosion(label == 1, iterations=1)
        # a linear fit of intensity over the liver (one tissue): the bias makes it vary by > 5%
        coords = np.column_stack([np.ones(liver.sum()), *[c / s for c, s in zip(np.nonzero(liver), label.shape, strict=True)]])
        fit = coords @ np.linalg.lstsq(coords, image[liver], rcond=None)[0]
        assert fit.max() - fit.min() > 0.05 * fit.mean(), (fit.min(), fit.max())
    # same anatomy and seed without the bias field: organ mean is the same everywhere
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    with_bias, label = mr_phantom((32, 32, 12), rng_a, noise=0.0, blur=False)
    flat, _ = mr_phantom((32, 32, 12), rng_b, noise=0.0, blur=False, bias=0.0)
    assert flat[label == 1].std() < 1e-3 < with_bias[label == 1].std()


def test_cells_touching_gaps_and_instances(cells_dataset):
    manifest = json.loads(cells_dataset.read_text())
    assert manifest["labels"] == {"0": "background", "1": "cell"} and manifest["tensorImageSize"] == "2D"
    touching_pairs = gap_pairs = 0
    for e in manifest["training"]:
        img = _load(cells_dataset, e["image"])
        assert img.shape == (64, 64) and img.get_data_dtype() == np.float32
        np.testing.assert_allclose(img.header.get_zooms()[:2], (0.5, 0.5))
        assert not np.allclose(img.affine, np.eye(4))
        semantic = np.asarray(_load(cells_dataset, e["label"]).dataobj)
        instance = np.asarray(_load(cells_dataset, e["instance"]).dataobj)
        assert semantic.dtype == np.uint8 and instance.dtype == np.uint16
        ids = np.unique(instance[instance > 0])
        np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
        assert len(ids) >= 10
        np.testing.assert_array_equal(semantic, instance > 0)
        for k in ids:
            assert ndimage.label(instance == k)[1] == 1  # each instance one connected piece
            near = instance[ndimage.binary_dilation(instance == k, np.ones((3, 3), bool), iterations=3)]
            for j in set(np.unique(near).tolist()) - {0, int(k)}:
                if j < k:
                    continue
                if _touches(instance == k, instance == j):
                    touching_pairs += 1
                elif _touches(instance == k, instance == j, gap=2):
                    gap_pairs += 1
        # the semantic mask merges touching cells: fewer components than instances
        assert ndimage.label(semantic)[1] < len(ids)
    assert touching_pairs >= 8 and gap_pairs >= 4, (touching_pairs, gap_pairs)


def test_in_memory_generators_scale_with_shape():
    rng = np.random.default_rng(1)
    for shape in [(24, 24, 6), (64, 48, 20)]:
        image, label = ct_phantom(shape, rng)
        assert image.shape == label.shape == shape
        fractions = [float((label == k).mean()) for k in (1, 2, 3)]
        assert all(f > 0.002 for f in fractions) and fractions[0] > fractions[1]
    image, semantic, instance = cells_image((48, 80), rng)
    assert image.shape == semantic.shape == instance.shape == (48, 80) and instance.max() > 5
