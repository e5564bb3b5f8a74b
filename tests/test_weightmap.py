"""boundary_weight_map against a brute-force reference (every voxel to every object voxel)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial.distance import cdist

from pipeline.synthetic_cells import random_blobs
from pipeline.weightmap import boundary_weight_map


def brute_force(label: np.ndarray, spacing, w0: float, sigma: float, border_on: str = "all") -> np.ndarray:
    """Textbook eq. 2 with w_c = 1: objects by scipy.ndimage.label (full connectivity) per class,
    distances by brute force over all object voxels."""
    grid = np.indices(label.shape).reshape(label.ndim, -1).T * np.asarray(spacing)
    dists = []
    for value in np.unique(label[label > 0]):
        comps, n = ndi.label(label == value, structure=np.ones((3,) * label.ndim))
        for i in range(1, n + 1):
            dists.append(cdist(grid, np.argwhere(comps == i) * np.asarray(spacing)).min(axis=1))
    d = np.sort(np.stack(dists), axis=0)
    border = w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2)) if len(dists) > 1 else 0 * d[0]
    border = border.reshape(label.shape)
    if border_on == "background":
        border = border * (label == 0)
    return 1 + border


@pytest.mark.parametrize("border_on", ["all", "background"])
def test_exact_and_fast_match_brute_force_2d_anisotropic(border_on):
    lab = random_blobs((24, 30), 7, np.random.default_rng(1))
    ref = brute_force(lab, (0.7, 1.3), w0=10, sigma=3, border_on=border_on)
    for exact in (True, False):
        w = boundary_weight_map(lab, (0.7, 1.3), w0=10, sigma=3, border_on=border_on, exact=exact)
        assert w.dtype == np.float32 and w.shape == lab.shape
        np.testing.assert_allclose(w, ref, atol=1e-3)


def test_exact_and_fast_match_brute_force_3d():
    lab = random_blobs((12, 14, 10), 6, np.random.default_rng(2))
    ref = brute_force(lab, (1.0, 0.8, 2.0), w0=8, sigma=2.5)
    assert ref.max() > 3  # the case has a real border term
    for exact in (True, False):
        np.testing.assert_allclose(boundary_weight_map(lab, (1.0, 0.8, 2.0), w0=8, sigma=2.5, exact=exact), ref, atol=1e-3)


@pytest.mark.parametrize("shape, spacing", [((96, 96), (1.0, 0.5)), ((40, 36, 30), (1.5, 1.5, 2.5))])
def test_fast_equals_direct_where_crops_cut(shape, spacing):
    """Small sigma against a large array: the cutoff crops are much smaller than the array."""
    lab = random_blobs(shape, 25, np.random.default_rng(3), classes=3)
    fast = boundary_weight_map(lab, spacing, w0=10, sigma=1.5, class_weights="balanced")
    direct = boundary_weight_map(lab, spacing, w0=10, sigma=1.5, class_weights="balanced", exact=True)
    assert np.abs(fast - direct).max() < 1e-3
    assert (direct - direct.min()).max() > 5


def test_gap_value_and_touching_classes():
    lab = np.zeros((9, 12), np.uint8)
    lab[1:4, 1:11] = 1
    lab[5:8, 1:11] = 1  # one-row gap at row 4: d1 = d2 = spacing[0]
    w = boundary_weight_map(lab, (2.0, 1.0), w0=10, sigma=4, border_on="background")
    assert w[4, 6] == pytest.approx(1 + 10 * np.exp(-(4.0**2) / 32), abs=1e-5)
    assert np.all(w[lab > 0] == 1)
    lab[4, 1:11] = 2  # a second class fills the gap: three objects touching
    w = boundary_weight_map(lab, (2.0, 1.0), w0=10, sigma=4, border_on="all")
    assert w[4, 6] == pytest.approx(1 + 10 * np.exp(-(2.0**2) / 32), abs=1e-5)  # d1 = 0, d2 = 2
    assert w[2, 6] == pytest.approx(1 + 10 * np.exp(-(4.0**2) / 32), abs=1e-5)  # d2 = 2 rows away


def test_full_connectivity_makes_diagonal_neighbours_one_object():
    lab = np.zeros((6, 6, 6), np.uint8)
    lab[1, 1, 1] = lab[2, 2, 2] = 1  # touching by a corner: one object, so no border term
    np.testing.assert_array_equal(boundary_weight_map(lab), np.ones(lab.shape, np.float32))
    lab[2, 2, 2] = 2  # a different class: two objects
    assert boundary_weight_map(lab).max() > 1


def test_class_weights():
    lab = np.zeros((10, 10), np.int32)
    lab[:2, :5] = 1  # 10 voxels; background 90
    w = boundary_weight_map(lab, class_weights="balanced")
    assert w.mean() == pytest.approx(1.0, abs=1e-6)
    assert w[0, 0] / w[9, 9] == pytest.approx(9.0, rel=1e-6)
    w = boundary_weight_map(lab, class_weights=[0.5, 3.0])
    assert w[0, 0] == 3.0 and w[9, 9] == 0.5
    with pytest.raises(ValueError, match="class"):
        boundary_weight_map(lab, class_weights=[1.0])


@pytest.mark.parametrize(
    "label, kwargs, match",
    [
        (np.random.default_rng(0).random((8, 8)), {}, "non-integer"),
        (np.zeros((8, 8), np.uint8), {}, "all background"),
        (np.ones((1, 8, 8), np.uint8), {}, "channel"),
        (np.ones((2, 8, 8, 8), np.uint8), {}, "2D or 3D"),
        (np.ones((8, 8), np.uint8), {"spacing": (1.0, 1.0, 1.0)}, "spacing"),
        (np.ones((8, 8), np.uint8), {"spacing": (1.0, 0.0)}, "positive"),
        (np.ones((8, 8), np.uint8), {"sigma": 0.0}, "sigma"),
        (np.ones((8, 8), np.uint8), {"border_on": "edges"}, "border_on"),
        (-np.ones((8, 8), np.int8), {}, "negative"),
    ],
)
def test_bad_input_raises_value_error(label, kwargs, match):
    with pytest.raises(ValueError, match=match):
        boundary_weight_map(label, **kwargs)


def test_whole_number_floats_accepted():
    lab = np.zeros((8, 8), np.float32)
    lab[1:3, 1:3], lab[5:7, 5:7] = 1.0, 2.0
    np.testing.assert_array_equal(boundary_weight_map(lab), boundary_weight_map(lab.astype(np.uint8)))


def write_label(path, array, zooms=(0.8, 1.2, 2.5)):
    import nibabel as nib

    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = (10.0, -30.0, 5.0)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def test_weightmap_cli_writes_a_figure(tmp_path):
    import subprocess
    import sys

    from matplotlib.image import imread

    lab = np.zeros((48, 40, 7), np.uint8)
    lab[6:22, 8:32, 1:6], lab[23:40, 8:32, 1:6], lab[10:30, 33:38, 2:5] = 1, 2, 1
    label = write_label(tmp_path / "label.nii.gz", lab)
    out = tmp_path / "fig" / "w.png"
    run = subprocess.run([sys.executable, "-m", "pipeline", "weightmap", str(label), "--out", str(out),
                          "--sigma", "3"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert out.stat().st_size > 20_000
    pixels = imread(out)[..., :3]
    assert pixels.std() > 0.1 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # a heat map, not a blank

    bad = write_label(tmp_path / "4d.nii.gz", np.ones((4, 4, 4, 2), np.uint8))
    run = subprocess.run([sys.executable, "-m", "pipeline", "weightmap", str(bad), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "2D or 3D" in run.stderr and len(run.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "array, match",
    [
        (np.random.default_rng(0).random((6, 6, 4)).astype(np.float32), "non-integer"),
        (np.zeros((6, 6, 4), np.uint8), "all background"),
        (np.arange(6 * 6 * 40, dtype=np.int32).reshape(6, 6, 40), "not a label"),
    ],
)
def test_weightmap_figure_bad_labels_raise_input_error(tmp_path, array, match):
    from pipeline.errors import InputError
    from pipeline.figures import weightmap_figure

    label = write_label(tmp_path / "l.nii.gz", array)
    with pytest.raises(InputError, match=match):
        weightmap_figure(label, tmp_path / "o.png")
    with pytest.raises(InputError, match="no such file"):
        weightmap_figure(tmp_path / "missing.nii.gz", tmp_path / "o.png")


def test_the_weightmap_figure_shows_the_slice_as_the_preview_does(tmp_path, monkeypatch):
    """The figure drew the raw array transposed with origin "lower": for the usual DICOM-converted
    NIfTI (voxel axes towards L, P, S) the axial slice stood upside down next to the preview's."""
    import nibabel as nib
    import numpy as np
    import pytest
    from matplotlib.figure import Figure

    from pipeline.figures import weightmap_figure
    from pipeline.preview import radiological_plane

    labels = np.zeros((12, 10, 5), np.uint8)
    labels[2:5, 1:4, :] = 1  # asymmetric in both in-plane axes
    labels[6:10, 5:9, :] = 2
    affine = np.diag([-0.8, -0.9, 2.5, 1.0])  # voxel axes towards L, P, S (as from DICOM's LPS)
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "lab.nii.gz")
    drawn = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(self), savefig(self, *a, **k))[1])
    weightmap_figure(tmp_path / "lab.nii.gz", tmp_path / "w.png", slice_index=2)
    image = drawn[0].axes[0].images[0]
    shown = np.asarray(image.get_array())
    shown = shown[::-1] if image.origin == "lower" else shown  # as it stands on screen, top row first
    view, expected, aspect = radiological_plane(labels[:, :, 2], affine, 2)
    assert view == "axial"
    np.testing.assert_array_equal(shown, expected)
    assert image.axes.get_aspect() == pytest.approx(aspect)
