import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from pipeline.errors import InputError, UsageError
from pipeline.phantoms import AIR, ct_phantom, draw_anatomy, lps_affine, mr_phantom
from pipeline.synthetic import CHANNEL_LAYOUTS, COHORT_LABELS, KINDS, patient_index, write_dataset
from pipeline.synthetic_cells import cells_image
from pipeline.synthetic_cohort import cohort_geometry, cohort_maps, draw_cohort_anatomy, draw_ct_study

COHORT_SHAPE = (64, 64, 40)  # the cohort's real field of view on a small matrix: ~5-7 mm voxels


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


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """6 ct-cohort studies (5 patients) on a 64x64x40 matrix over each study's real field of view."""
    return write_dataset("ct-cohort", 6, tmp_path_factory.mktemp("cohort"), seed=0, shape=COHORT_SHAPE)


@pytest.fixture(scope="module")
def mr2ch(tmp_path_factory) -> dict[str, Path]:
    """3 mr2ch studies of 32x32x12 in each channel layout, same seed."""
    return {layout: write_dataset("mr2ch", 3, tmp_path_factory.mktemp(f"mr2ch_{layout}"), seed=0,
                                  shape=(32, 32, 12), channel_layout=layout) for layout in CHANNEL_LAYOUTS}


def _cohort_case(manifest: Path, e: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    img = _load(manifest, e["image"])
    return np.asarray(img.dataobj), np.asarray(_load(manifest, e["label"]).dataobj), img.affine


def _anatomy_of(seed: int, i: int) -> dict:
    return draw_cohort_anatomy(np.random.default_rng([seed, patient_index(i), 1_000_003]))


def test_kinds_name_every_kind_in_one_line():
    assert set(KINDS) == {"ct3d", "mr3d", "cells2d", "ct-cohort", "mr2ch"}
    assert all(d and "\n" not in d for d in KINDS.values())
    assert CHANNEL_LAYOUTS[0] == "4d"


def test_cohort_default_acquisitions_are_realistic():
    """The realistic default (512 matrix) from the drawn parameters and one full-resolution slice."""
    in_plane, slices, widths, depths = set(), set(), [], []
    for i in range(24):
        anatomy = _anatomy_of(0, i)
        study = draw_ct_study(np.random.default_rng([0, i]), anatomy)
        shape, affine, axes = cohort_geometry(study)
        zooms = np.abs(np.diag(affine)[:3])
        assert shape[:2] == (512, 512) and zooms[0] == zooms[1] and 0.6 <= zooms[0] <= 0.9
        assert 1.5 <= zooms[2] <= 5 and 200 <= shape[2] * zooms[2] <= 260
        assert nib.aff2axcodes(affine) == ("L", "P", "S")
        width, depth = (2 * a for a in anatomy["body"]["semi_axes"])
        assert 512 * zooms[0] > width + 2 * abs(study["offset"][0]) and 512 * zooms[1] > depth
        in_plane.add(round(float(zooms[0]), 3))
        slices.add(float(zooms[2]))
        widths.append(width)
        depths.append(depth)
    assert len(in_plane) >= 20 and len(slices) >= 3  # spacing varies between cases, as in a real cohort
    assert 250 < min(widths) and max(widths) < 345 and 280 < np.mean(widths) < 315
    assert 180 < min(depths) and max(depths) < 265 and 205 < np.mean(depths) < 240
    # one slice at full resolution, through the kidneys: the body is ~300 mm across in the voxels too
    anatomy = _anatomy_of(0, 0)
    shape, affine, axes = cohort_geometry(draw_ct_study(np.random.default_rng([0, 0]), anatomy))
    z = np.float32(anatomy["kidney_left"]["center"][2])
    tissue, label = cohort_maps(anatomy, [axes[0], axes[1], np.array([z], np.float32)])
    assert tissue.shape == (512, 512, 1) and {2, 4} <= set(np.unique(label).tolist())
    xs = np.flatnonzero((tissue != AIR).any(axis=(1, 2)))
    measured = (xs[-1] - xs[0] + 1) * affine[0, 0]
    assert abs(abs(measured) - 2 * anatomy["body"]["semi_axes"][0]) < 2 * abs(affine[0, 0])


def test_cohort_files_geometry_and_manifest(cohort):
    manifest = json.loads(cohort.read_text())
    assert manifest["labels"] == COHORT_LABELS and manifest["modality"] == {"0": "CT"}
    assert manifest["tensorImageSize"] == "3D" and manifest["numTraining"] == 6
    assert len({e["patient"] for e in manifest["training"]}) == 5
    zooms = set()
    for i, e in enumerate(manifest["training"]):
        image, label, affine = _cohort_case(cohort, e)
        img = _load(cohort, e["image"])
        assert image.shape == label.shape == COHORT_SHAPE and image.dtype == np.int16 and label.dtype == np.uint8
        assert nib.aff2axcodes(affine) == ("L", "P", "S") and int(img.header["sform_code"]) == 1
        zooms.add(tuple(np.round(img.header.get_zooms(), 3)))
        assert set(np.unique(label).tolist()) == {0, 1, 2, 3, 4}
        # body width in mm from the mask and the affine (RAS x of the outermost body voxels)
        ras_x = nib.affines.apply_affine(affine, np.argwhere(image > -500))[:, 0]
        width = ras_x.max() - ras_x.min() + abs(affine[0, 0])
        drawn = 2 * _anatomy_of(0, i)["body"]["semi_axes"][0]
        assert 240 < width < 350 and abs(width - drawn) < 1.5 * abs(affine[0, 0]), (width, drawn)
    assert len(zooms) == 6  # each study its own field of view, so its own spacing


def test_cohort_organs_adult_sized_on_their_sides(cohort):
    volumes = []
    for e in _entries(cohort):
        image, label, affine = _cohort_case(cohort, e)
        ml = abs(np.linalg.det(affine[:3, :3])) / 1000
        liver, kidney_r, spleen, kidney_l = (float((label == k).sum() * ml) for k in (1, 2, 3, 4))
        assert 800 < liver < 2500 and 80 < kidney_r < 300 and 80 < kidney_l < 300 and 60 < spleen < 350
        volumes.append([liver, kidney_r, spleen, kidney_l])
        # RAS +x points to the patient's right (LPS +x to the left): the right kidney and the liver
        # have the larger RAS x, the left kidney and the spleen the smaller
        ras = {k: nib.affines.apply_affine(affine, np.argwhere(label == k)).mean(axis=0) for k in (1, 2, 3, 4)}
        body_x = nib.affines.apply_affine(affine, np.argwhere(image > -500))[:, 0].mean()
        assert ras[2][0] > body_x + 30 > body_x - 30 > ras[4][0]
        assert ras[1][0] > body_x > ras[3][0]
        assert ras[1][2] > ras[2][2] and ras[3][2] > ras[4][2]  # liver and spleen above the kidneys
        assert ras[2][1] < ras[1][1] + 40  # kidneys posterior (RAS y smaller) or level with the liver
        # Hounsfield units
        assert abs(np.median(image[:3, :3]) + 1000) < 40 and image.max() > 500  # air, spine
        hu = [float(np.median(image[label == k])) for k in (1, 2, 3, 4)]
        assert 40 < hu[0] < 80 and 15 < hu[1] < 165 and 30 < hu[2] < 70 and abs(hu[1] - hu[3]) < 25, hu
    # cases 0 and 1 are two studies of one patient: same organs, another acquisition
    np.testing.assert_allclose(volumes[0], volumes[1], rtol=0.1)


def test_cohort_voxel_scale_keeps_the_drawn_spacing_ratios(tmp_path):
    manifest = write_dataset("ct-cohort", 3, tmp_path, seed=2, voxel_scale=6)
    spacings = []
    for e in _entries(manifest):
        img = _load(manifest, e["image"])
        sx, sy, sz = np.asarray(img.header.get_zooms()) / 6
        assert sx == pytest.approx(sy) and 0.6 <= sx <= 0.9 and 1.5 <= sz <= 5
        assert abs(img.shape[0] - 512 / 6) < 1 and 200 <= img.shape[2] * sz * 6 <= 265
        spacings.append((round(float(sx), 4), float(sz)))
    assert len(set(spacings)) == 3


def test_cohort_and_mr2ch_deterministic_per_seed_and_case(tmp_path, cohort, mr2ch):
    for kind, first, kw in (("ct-cohort", cohort, {"shape": COHORT_SHAPE}), ("mr2ch", mr2ch["files"],
                                                                              {"shape": (32, 32, 12), "channel_layout": "files"})):
        again = write_dataset(kind, 2, tmp_path / kind, seed=0, **kw)
        other = write_dataset(kind, 1, tmp_path / f"{kind}_other", seed=1, **kw)
        for a, b in zip(_entries(first)[:2], _entries(again), strict=True):
            assert a == b
            for rel in [*np.atleast_1d(a["image"]), a["label"]]:
                assert (first.parent / rel).read_bytes() == (again.parent / rel).read_bytes()
        rel = np.atleast_1d(_entries(first)[0]["image"])[0]
        assert (first.parent / rel).read_bytes() != (other.parent / rel).read_bytes()


def test_mr2ch_4d_two_contrasts(mr2ch):
    manifest = json.loads(mr2ch["4d"].read_text())
    assert manifest["tensorImageSize"] == "4D" and manifest["labels"]["2"] == "kidney"
    assert manifest["modality"] == manifest["channel_names"] == {"0": "T1", "1": "T2"}
    for e in manifest["training"]:
        img = _load(mr2ch["4d"], e["image"])
        assert img.shape == (32, 32, 12, 2) and img.get_data_dtype() == np.float32
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
        image, label = np.asarray(img.dataobj), np.asarray(_load(mr2ch["4d"], e["label"]).dataobj)
        assert set(np.unique(label).tolist()) == {0, 1, 2, 3} and image.min() >= 0
        t1, t2 = ([float(np.median(image[..., c][label == k])) for k in (1, 2, 3)] for c in (0, 1))
        assert t1[0] > t1[2] > t1[1] and t2[1] > t2[2] > t2[0], (t1, t2)  # liver, kidney, spleen


def test_mr2ch_one_file_per_channel(mr2ch):
    four_d, files = json.loads(mr2ch["4d"].read_text()), json.loads(mr2ch["files"].read_text())
    assert files["tensorImageSize"] == "3D" and files["file_ending"] == ".nii.gz"
    assert files["modality"] == files["channel_names"] == {"0": "T1", "1": "T2"}
    for a, b in zip(four_d["training"], files["training"], strict=True):
        assert b["id"] == f"mr2ch_{b['label'][-10:-7]}" and b["patient"] == a["patient"] and b["label"] == a["label"]
        assert b["image"] == [f"./imagesTr/{b['id']}_0000.nii.gz", f"./imagesTr/{b['id']}_0001.nii.gz"]
        stacked = np.asarray(_load(mr2ch["4d"], a["image"]).dataobj)
        for c, rel in enumerate(b["image"]):
            img = _load(mr2ch["files"], rel)
            assert img.shape == (32, 32, 12) and np.allclose(img.affine, lps_affine())
            np.testing.assert_array_equal(np.asarray(img.dataobj), stacked[..., c])
        assert (mr2ch["4d"].parent / a["label"]).read_bytes() == (mr2ch["files"].parent / b["label"]).read_bytes()
    assert len(list((mr2ch["files"].parent / "imagesTr").iterdir())) == 6


@pytest.mark.parametrize("kind, kwargs", [
    ("ct3d", {"channel_layout": "files"}), ("mr2ch", {"channel_layout": "nifti"}), ("mr3d", {"voxel_scale": 2}),
    ("ct-cohort", {"voxel_scale": 0.5}), ("ct-cohort", {"voxel_scale": 2, "shape": (64, 64, 40)}),
    ("ct-cohort", {"shape": (64, 64)})])
def test_new_options_only_where_they_apply(tmp_path, kind, kwargs):
    with pytest.raises(UsageError):
        write_dataset(kind, 1, tmp_path, **kwargs)


# -- arguments, the output folder, nothing left on failure ------------------------------------------------

def _synth(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "synth", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args, text", [
    (["--kind", "ct3d", "--seed", "-1"], "--seed must be a non-negative integer, got -1"),
    (["--kind", "ct3d", "--shape", "2000", "2000", "2000"], "--shape [2000, 2000, 2000] is 8,000,000,000 voxels"),
    (["--kind", "ct-cohort", "--voxel-scale", "1e9"], "--voxel-scale is 1 to 10"),
    (["--kind", "ct-cohort", "--voxel-scale", "nan"], "--voxel-scale is 1 to 10"),
])
def test_bad_seed_shape_or_scale_is_one_usage_line_and_leaves_nothing(tmp_path, args, text):
    r = _synth(*args, "--n", "1", "--out", str(tmp_path / "out"))
    [line] = r.stderr.strip().splitlines()
    assert r.returncode == 2 and line.startswith(f"segpipe synth: error: {text}"), r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_failed_synth_leaves_nothing_and_keeps_a_previous_output(tmp_path, monkeypatch):
    import pipeline.synthetic as S

    calls = []

    def failing(*a, **k):
        calls.append(a)
        if len(calls) > 2:
            raise MemoryError("out of memory")
        return real(*a, **k)

    real = S.write_nifti
    monkeypatch.setattr(S, "write_nifti", failing)
    with pytest.raises(MemoryError):
        write_dataset("ct3d", 2, tmp_path / "new" / "ds", shape=(16, 16, 4))
    assert list(tmp_path.iterdir()) == []  # no half dataset, no empty imagesTr/, no hidden folder, no parents
    monkeypatch.setattr(S, "write_nifti", real)
    before = write_dataset("ct3d", 2, tmp_path / "ds", shape=(16, 16, 4)).read_bytes()
    monkeypatch.setattr(S, "write_nifti", failing)
    calls.clear()
    with pytest.raises(MemoryError):
        write_dataset("ct3d", 3, tmp_path / "ds", seed=5, shape=(16, 16, 4))
    assert (tmp_path / "ds" / "dataset.json").read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_output_folder_holds_one_dataset(tmp_path, monkeypatch):
    import pipeline.synthetic as S

    written = []
    real_atomic = S.atomic_path
    monkeypatch.setattr(S, "atomic_path", lambda p: written.append(Path(p).name) or real_atomic(p))
    out = tmp_path / "ds"
    write_dataset("ct3d", 3, out, shape=(16, 16, 4))
    assert written == ["dataset.json"]  # atomically
    (out / "splits.json").write_text("{}")  # derived from these cases: stale for the next ones
    manifest = write_dataset("ct3d", 2, out, seed=1, shape=(16, 16, 4))  # a previous synth of the kind: replaced
    assert sorted(f.name for f in out.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]
    assert sorted(f.name for f in (out / "imagesTr").iterdir()) == ["ct_000.nii.gz", "ct_001.nii.gz"]
    assert "seed 1" in json.loads(manifest.read_text())["description"]
    with pytest.raises(InputError, match="not a previous `segpipe synth --kind mr3d` output"):
        write_dataset("mr3d", 1, out, shape=(16, 16, 4))  # another kind: never mixed
    (out / "imagesTr" / "mine.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="mine.nii.gz is not a synth file"):
        write_dataset("ct3d", 1, out, shape=(16, 16, 4))  # a file synth did not write is never deleted
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        write_dataset("ct3d", 1, other, shape=(16, 16, 4))
    assert [f.name for f in other.iterdir()] == ["notes.txt"]
    write_dataset("ct3d", 1, tmp_path / "empty", shape=(16, 16, 4))  # an empty folder is filled
    assert (tmp_path / "empty" / "dataset.json").is_file() and not list(tmp_path.glob(".*"))
