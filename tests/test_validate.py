"""validate(): one line per defect naming the entry, the file and the problem; never a crash."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.studies import read_header
from pipeline.validation import validate_manifest as validate

AFFINE = np.array([[0.0, -0.9, 0.1, 30.0], [1.2, 0.0, 0.0, -12.5], [0.0, 0.05, 2.5, 7.0], [0, 0, 0, 1]])
SHAPE = (10, 9, 6)
LABELS = {"0": "background", "1": "a", "2": "b"}


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def make_dataset(root: Path, n: int = 2, **manifest) -> Path:
    """n clean cases (float32 image, uint8 label 0..2) and dataset.json in MSD layout."""
    rng = np.random.default_rng(0)
    for i in range(n):
        label = np.zeros(SHAPE, np.uint8)
        label[2:5, 2:6, 1:4] = 1
        label[6:8, 3:7, 2:5] = 2
        save(root / "imagesTr" / f"case_{i}.nii.gz", rng.normal(size=SHAPE).astype(np.float32))
        save(root / "labelsTr" / f"case_{i}.nii.gz", label)
    doc = {"name": "t", "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": LABELS,
           "numTraining": n, "training": [{"image": f"./imagesTr/case_{i}.nii.gz",
                                           "label": f"./labelsTr/case_{i}.nii.gz"} for i in range(n)],
           "test": [], **manifest}
    (root / "dataset.json").write_text(json.dumps(doc))
    return root / "dataset.json"


def patch_header(path: Path, offset: int, fmt: str, *values) -> None:
    """Overwrite header bytes (nibabel would repair dim/pixdim on save)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into(fmt, raw, offset, *values)
    path.write_bytes(gzip.compress(bytes(raw)))


IMG, LAB = "imagesTr/case_0.nii.gz", "labelsTr/case_0.nii.gz"


def _missing(root):
    (root / IMG).unlink()
    return IMG, "missing"


def _not_nifti_suffix(root):
    (root / "imagesTr/case_0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    doc = json.loads((root / "dataset.json").read_text())
    doc["training"][0]["image"] = "./imagesTr/case_0.png"
    (root / "dataset.json").write_text(json.dumps(doc))
    return "imagesTr/case_0.png", "not a NIfTI file"


def _not_nifti_content(root):
    (root / IMG).write_bytes(gzip.compress(b"this is a text file, not an image\n" * 20))
    return IMG, "not a readable NIfTI image"


def _not_gzip(root):
    (root / IMG).write_text("plain text named .nii.gz\n")
    return IMG, "not gzip-compressed"


def _truncated(root):
    save(root / IMG, np.random.default_rng(1).normal(size=(40, 40, 20)).astype(np.float32))
    save(root / LAB, np.pad(np.ones((30, 30, 10), np.uint8), ((5, 5), (5, 5), (5, 5))))
    raw = (root / IMG).read_bytes()
    (root / IMG).write_bytes(raw[: len(raw) // 2])
    return IMG, "truncated"


def _truncated_plain(root):
    doc = json.loads((root / "dataset.json").read_text())
    doc["training"][0]["image"] = "./imagesTr/case_0.nii"
    (root / "dataset.json").write_text(json.dumps(doc))
    save(root / "imagesTr/case_0.nii", np.ones(SHAPE, np.float32))
    raw = (root / "imagesTr/case_0.nii").read_bytes()
    (root / "imagesTr/case_0.nii").write_bytes(raw[:-100])
    return "imagesTr/case_0.nii", f"truncated: {len(raw) - 100} bytes, the header needs {len(raw)}"


def _empty(root):
    (root / IMG).write_bytes(b"")
    return IMG, "empty file"


def _four_d(root):
    save(root / IMG, np.zeros((*SHAPE, 3), np.float32))
    return IMG, "4D image (10, 9, 6, 3) where 3D is expected"


def _shape_mismatch(root):
    save(root / LAB, np.ones((10, 9, 5), np.uint8))
    return LAB, "shape (10, 9, 6) != label"


def _affine_mismatch(root):
    moved = AFFINE.copy()
    moved[0, 3] += 2.0
    save(root / LAB, np.asarray(nib.load(root / LAB).dataobj), moved)
    return LAB, "affines differ (by up to 2 mm)"


def _pixdim(value):
    def breaker(root):
        patch_header(root / IMG, 76 + 4 * 2, "<f", value)  # pixdim[2]
        return IMG, "invalid voxel spacing"
    return breaker


def _nan_inf(root):
    data = np.asarray(nib.load(root / IMG).dataobj).copy()
    data[1, 1, 1], data[2, 2, 2], data[3, 3, 3] = np.nan, np.nan, np.inf
    save(root / IMG, data)
    return IMG, "non-finite voxels: 2 NaN, 1 Inf"


def _non_integer_label(root):
    data = np.asarray(nib.load(root / LAB).dataobj).astype(np.float32)
    data[3, 3, 2] = 0.5
    save(root / LAB, data)
    return LAB, "non-integer label values in 1 voxels (e.g. [0.5])"


def _undeclared_label(root):
    data = np.asarray(nib.load(root / LAB).dataobj).copy()
    data[0, 0, 0] = 7
    save(root / LAB, data)
    return LAB, "label values [7] not declared"


def _absurd_voxels(root):
    patch_header(root / IMG, 40, "<4h", 3, 30000, 30000, 30000)  # dim[0..3]
    return IMG, "header claims 27000000000000 voxels"


def _spacing_over_100mm(root):
    patch_header(root / IMG, 76 + 4 * 3, "<f", 1000.0)  # pixdim[3]: 1000 mm slices
    return IMG, "voxel spacing [1.2, 0.901388, 1000.0] mm is outside the plausible 1e-06 to 100 mm"


def _spacing_under_1nm(root):
    patch_header(root / IMG, 76 + 4 * 1, "<f", 1e-9)  # pixdim[1]
    return IMG, "voxel spacing [1e-09, 0.901388, 2.502] mm is outside the plausible"


def _label_off_integers(root):
    data = np.asarray(nib.load(root / LAB).dataobj).astype(np.float32)
    data[data == 1] = 1.002  # more than 1e-3 off: read_label refuses it too
    save(root / LAB, data)
    return LAB, "non-integer label values in 36 voxels (e.g. [1.00"


BAD_INPUTS = {
    "missing": _missing, "not_nifti_suffix": _not_nifti_suffix, "not_nifti_content": _not_nifti_content,
    "not_gzip": _not_gzip, "truncated_gzip": _truncated, "truncated_nii": _truncated_plain,
    "empty_file": _empty, "4d_for_3d": _four_d,
    "shape_mismatch": _shape_mismatch, "affine_mismatch": _affine_mismatch, "zero_pixdim": _pixdim(0.0),
    "negative_pixdim": _pixdim(-1.0), "nan_pixdim": _pixdim(float("nan")), "nan_inf_voxels": _nan_inf,
    "non_integer_label": _non_integer_label, "undeclared_label": _undeclared_label,
    "absurd_voxel_count": _absurd_voxels, "spacing_over_100mm": _spacing_over_100mm,
    "spacing_under_1nm": _spacing_under_1nm, "label_off_integers": _label_off_integers,
}


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_each_bad_input_is_one_line_naming_entry_file_and_problem(tmp_path, kind):
    manifest = make_dataset(tmp_path)
    rel, problem = BAD_INPUTS[kind](tmp_path)
    problems = validate(manifest)
    assert len(problems) == 1, problems
    line = problems[0]
    assert "\n" not in line
    assert line.startswith("training[0] case_0")  # index and id (a .png keeps its suffix in the id)
    assert str(tmp_path / rel) in line
    assert problem in line


def test_clean_dataset_has_no_problems_and_tolerates_tiny_affine_noise(tmp_path):
    manifest = make_dataset(tmp_path, n=3)
    nudged = AFFINE.copy()
    nudged[:3, 3] += 2e-4  # float32 round-off in a label's sform is not a mismatch
    save(tmp_path / "labelsTr/case_1.nii.gz", np.asarray(nib.load(tmp_path / "labelsTr/case_1.nii.gz").dataobj), nudged)
    assert validate(manifest) == []


def test_multichannel_4d_image_is_fine_when_the_manifest_declares_the_channels(tmp_path):
    manifest = make_dataset(tmp_path, n=1, tensorImageSize="4D", modality={"0": "T1", "1": "T2"})
    save(tmp_path / IMG, np.ones((*SHAPE, 2), np.float32))
    assert validate(manifest) == []
    save(tmp_path / IMG, np.ones((*SHAPE, 3), np.float32))
    [line] = validate(manifest)
    assert "with 2 channels on the last axis is expected" in line


def test_a_lateral_pairs_declaration_is_checked(tmp_path):
    """The manifest's optional left/right pairs (used by segpipe plan): fine by name or value, one
    line naming the manifest for a label that does not exist or the background."""
    names = list(LABELS.values())
    assert validate(make_dataset(tmp_path / "ok", n=1, lateral_pairs=[[names[1], names[2]]])) == []
    assert validate(make_dataset(tmp_path / "values", n=1, lateral_pairs=[[1, 2]])) == []
    manifest = make_dataset(tmp_path / "bad", n=1, lateral_pairs=[[names[1], "left_kidney"]])
    [line] = validate(manifest)
    assert line.startswith(f"{manifest}: lateral_pairs[0]: unknown label 'left_kidney'")
    [line] = validate(make_dataset(tmp_path / "bg", n=1, lateral_pairs=[[0, 1]]))
    assert "label 0 ('background') is the background, it has no side" in line


def test_test_entries_as_plain_strings_are_checked_too(tmp_path):
    manifest = make_dataset(tmp_path, n=1, test=["./imagesTs/new.nii.gz", {"image": "./imagesTs/other.nii.gz"}])
    save(tmp_path / "imagesTs/other.nii.gz", np.ones(SHAPE, np.float32))
    assert validate(manifest) == [f"test[0] new: image {tmp_path / 'imagesTs/new.nii.gz'}: missing file"]


def _world_readable_dataset() -> Path:
    """A dataset in a folder that an unprivileged user can traverse (pytest's tmp is 0700)."""
    root = Path(tempfile.mkdtemp(prefix="segpipe-perm-"))
    os.chmod(root, 0o755)
    manifest = make_dataset(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(Path(dirpath) / name, 0o755)
        for name in filenames:
            os.chmod(Path(dirpath) / name, 0o644)
    return manifest


def test_unreadable_file_is_reported(tmp_path):
    """As root chmod cannot hide a file, so validate runs with the effective uid of `nobody`."""
    as_root = os.geteuid() == 0
    manifest = _world_readable_dataset() if as_root else make_dataset(tmp_path)
    assert validate(manifest) == []  # also imports what validate imports lazily, while we may
    image = manifest.parent / IMG
    image.chmod(0)
    try:
        if as_root:
            os.seteuid(65534)
        problems = validate(manifest)
    finally:
        if as_root:
            os.seteuid(0)
            shutil.rmtree(manifest.parent)
        else:
            image.chmod(0o644)
    assert problems == [f"training[0] case_0: image {image}: cannot read (Permission denied)"]


def test_read_header_refuses_with_one_line(tmp_path):
    manifest = make_dataset(tmp_path, n=1)
    path = manifest.parent / IMG
    read_header(path)
    with pytest.raises(Exception, match=r"more than the limit of 100; refusing to allocate") as e:
        read_header(path, max_voxels=100)
    assert str(e.value).startswith(f"{path}: header claims 540 voxels")


def test_cli_exit_codes_and_one_line_per_defect(tmp_path):
    manifest = make_dataset(tmp_path, n=4)
    run = [sys.executable, "-m", "pipeline", "validate", str(manifest)]
    r = subprocess.run(run, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == f"{manifest}: ok"
    _missing(tmp_path)
    save(tmp_path / "labelsTr/case_2.nii.gz", np.zeros(SHAPE, np.uint8))  # a case without the structures
    (tmp_path / "labelsTr/case_3.nii.gz").write_bytes(b"")
    r = subprocess.run(run, capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stdout.splitlines() == [
        f"training[0] case_0: image {tmp_path / IMG}: missing file",
        f"training[3] case_3: label {tmp_path / 'labelsTr/case_3.nii.gz'}: empty file (0 bytes)",
    ]
    assert "2 problem(s)" in r.stderr
    assert "1 label(s) all background, kept as cases without the structures: training[2] case_2" in r.stderr


def test_all_background_labels_are_cases_unless_every_label_is_empty(tmp_path, caplog):
    manifest = make_dataset(tmp_path, n=3)
    save(tmp_path / LAB, np.zeros(SHAPE, np.uint8))
    with caplog.at_level("WARNING", logger="pipeline.validation"):
        assert validate(manifest) == []  # a study without the structures is a valid training case
    assert "1 label(s) all background" in caplog.text and "training[0] case_0" in caplog.text
    save(tmp_path / LAB, np.full(SHAPE, 7, np.uint8))  # another problem of the same label still counts
    assert len(validate(manifest)) == 1
    for i in range(3):
        save(tmp_path / f"labelsTr/case_{i}.nii.gz", np.zeros(SHAPE, np.uint8))
    assert validate(manifest) == [f"training[0] case_0: label {tmp_path / LAB}: label is empty (all background), "
                                  "as every training label (3) is: nothing to learn"]


def test_synthetic_datasets_validate_clean(ct_dataset, cells_dataset):
    assert validate(ct_dataset) == []
    assert validate(cells_dataset) == []


# -- one file per channel, and the bundle's contract ------------------------------------------------------

def _per_file(tmp_path: Path) -> Path:
    from pipeline.synthetic import write_dataset

    return write_dataset("mr2ch", 2, tmp_path / "mr", seed=0, shape=(24, 24, 6), channel_layout="files")


def test_channel_file_lists_validate_and_each_defect_is_one_line_naming_the_file(tmp_path):
    manifest = _per_file(tmp_path)
    assert validate(manifest) == []
    doc = json.loads(manifest.read_text())
    doc["training"][0]["image"] = doc["training"][0]["image"][:1]  # one channel file of two
    second = tmp_path / "mr" / doc["training"][1]["image"][1]
    img = nib.load(second)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :5], img.affine), second)  # a slice short
    manifest.write_text(json.dumps(doc))
    first, other = validate(manifest)
    assert first.startswith("training[0] mr2ch_000: image ") and "1 file(s) in the image list" in first
    assert other.startswith("training[1] mr2ch_001: image ") and str(second.resolve()) in other
    assert "differs from channel 0" in other


def test_contract_refuses_other_labels_or_channels_in_one_line_naming_both_sides(tmp_path, ct_dataset):
    from pipeline.errors import InputError
    from pipeline.validation import check_contract

    bundles = Path(__file__).resolve().parents[1] / "bundles"
    check_contract(bundles / "phantom_ct_3d", ct_dataset)  # same labels: fine
    with pytest.raises(InputError) as e:
        check_contract(bundles / "hippocampus_mri_3d", ct_dataset)
    line = str(e.value)
    assert "\n" not in line and str(ct_dataset) in line and "hippocampus_mri_3d" in line
    assert "['background', 'liver', 'kidney', 'spleen'] (4)" in line and "['background', 'anterior', 'posterior'] (3)" in line
    doc = json.loads(ct_dataset.read_text())
    (tmp_path / "ct").mkdir()
    two = tmp_path / "ct" / "dataset.json"
    two.write_text(json.dumps({**doc, "training": [], "modality": {"0": "CT", "1": "PET"},
                               "labels": {"0": "Background", "1": "Liver", "2": "kidney", "3": "SPLEEN"}}))
    with pytest.raises(InputError, match=r"2 channel\(s\) .* do not match bundle phantom_ct_3d .* 1 input channel"):
        check_contract(bundles / "phantom_ct_3d", two)  # label names match without case; channels do not


# -- spacing, float labels, one line per problem ---------------------------------------------------------

def test_microscopy_spacings_validate_clean(tmp_path):
    """A light-microscopy pixel in mm (1e-4, 0.1 um) is a spacing, not an error."""
    manifest = make_dataset(tmp_path, n=2)
    for f in (*tmp_path.glob("imagesTr/*.nii.gz"), *tmp_path.glob("labelsTr/*.nii.gz")):
        save(f, np.asarray(nib.load(f).dataobj), np.diag([1e-4, 1e-4, 1e-3, 1.0]))
    assert validate(manifest) == []


def test_a_case_ten_times_off_the_median_spacing_warns_naming_it_and_its_memory(tmp_path, caplog):
    manifest = make_dataset(tmp_path, n=4)
    coarse = AFFINE.copy()
    coarse[:3, 2] *= 12  # 30 mm slices among 2.5 mm ones
    for f in (IMG, LAB):
        save(tmp_path / f, np.asarray(nib.load(tmp_path / f).dataobj), coarse)
    with caplog.at_level("WARNING", logger="pipeline.validation"):
        assert validate(manifest) == []
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"training[0] case_0: image {tmp_path / IMG}: spacing" in line and "12x off the training median" in line
    assert "MiB as float32" in line


def test_spacing_warnings_name_the_memory_a_resample_would_take():
    from pipeline.validation import spacing_warnings

    def case(i, spacing, shape):
        return ("training", f"training[{i}] c{i}", f"c{i}.nii.gz",
                {"affine": np.diag([*spacing, 1.0]), "pixdim": tuple(spacing), "shape": tuple(shape)})

    thin = [case(i, [0.8, 0.8, 2.5], [512, 512, 100]) for i in range(4)]
    [line] = spacing_warnings([*thin, case(4, [0.8, 0.8, 1000.0], [512, 512, 1])], 3)
    assert line.startswith("training[4] c4: image c4.nii.gz: spacing [0.8, 0.8, 1000.0] mm is 400x off")
    assert "[512, 512, 400] voxels, 400 MiB as float32" in line
    big = [case(i, [0.5, 0.5, 0.5], [2048, 2048, 600]) for i in range(3)]  # none off the median, each 9.4 GiB
    assert [w.split(":")[0] for w in spacing_warnings(big, 3)] == ["training[0] c0", "training[1] c1", "training[2] c2"]
    assert "9.38 GiB as float32" in spacing_warnings(big, 3)[0]


def test_float_labels_follow_read_labels_one_rounding_rule(tmp_path):
    from pipeline.errors import InputError
    from pipeline.fileio import read_label

    manifest = make_dataset(tmp_path, n=2)
    data = np.asarray(nib.load(tmp_path / LAB).dataobj).astype(np.float32)
    save(tmp_path / LAB, np.where(data > 0, data + 4e-4, data).astype(np.float32))  # resampled: 1.0004, 2.0004
    assert validate(manifest) == [] and set(np.unique(read_label(tmp_path / LAB)[0])) == {0, 1, 2}
    save(tmp_path / LAB, np.where(data > 0, data + 2e-3, data).astype(np.float32))
    assert len(validate(manifest)) == 1
    with pytest.raises(InputError, match="non-integer"):
        read_label(tmp_path / LAB)
    # NaN is no integer either: read_label (evaluate's reference, weight maps) turned it into -2**63
    save(tmp_path / LAB, np.where(data > 0, np.nan, data).astype(np.float32))
    with pytest.raises(InputError, match=r"non-integer label values \(e.g. nan\)"):
        read_label(tmp_path / LAB)


def test_require_valid_says_each_problem_once(tmp_path, caplog):
    from pipeline.errors import InputError
    from pipeline.validation import require_valid

    manifest = make_dataset(tmp_path, n=3)
    _undeclared_label(tmp_path)
    (tmp_path / "imagesTr/case_2.nii.gz").unlink()
    with caplog.at_level("ERROR", logger="pipeline.validation"), pytest.raises(InputError) as e:
        require_valid(manifest)
    first, other = str(tmp_path / LAB), str(tmp_path / "imagesTr/case_2.nii.gz")
    assert str(e.value).startswith(f"{manifest}: failed validation with 2 problem(s), first: training[0] case_0")
    assert first in str(e.value) and first not in caplog.text and caplog.text.count(other) == 1
    assert "problem 2 of 2: training[2]" in caplog.text  # read above the error line that names the first
    missing = tmp_path / "nowhere.json"  # a problem of the manifest itself: the manifest named once
    with pytest.raises(InputError) as e:
        require_valid(missing)
    assert str(e.value).count(str(missing)) == 1 and str(e.value).endswith("first: no such manifest")
