"""Study discovery: NIfTI files and DICOM series (written slice by slice with SimpleITK)."""

from __future__ import annotations

import contextlib
import json
import locale
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.dicom_series import dicom_series_to_nifti
from pipeline.errors import InputError
from pipeline.studies import find_studies, read_header
from pipeline.validation import validate_manifest as validate

SPACING = (0.7, 0.8, 2.5)
ORIGIN = (10.0, -20.0, 30.0)
_T = np.deg2rad(20)
DIRECTION = np.array([[np.cos(_T), -np.sin(_T), 0], [np.sin(_T), np.cos(_T), 0], [0, 0, 1]])


def volume(shape_zyx=(5, 6, 7), spacing=SPACING) -> sitk.Image:
    img = sitk.GetImageFromArray(np.arange(np.prod(shape_zyx), dtype=np.int16).reshape(shape_zyx))
    img.SetSpacing(spacing)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION.ravel().tolist())
    return img


@contextlib.contextmanager
def keep_locale() -> Iterator[None]:
    """Restore the process locale: GDCM's DICOM writer, given a slice with DICOM tags, leaves it at
    "C" (measured with SimpleITK 2.5.7; reading DICOM does not), after which Python's ``open()``
    reads ASCII only for the rest of the pytest process, and torch.compile in a later test cannot
    load its UTF-8 kernel templates. The product never writes DICOM; this test helper does."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


@keep_locale()
def write_series(folder: Path, img: sitk.Image, uid: str = "1.2.826.0.1.3680043.2.1125.7.1",
                 skip: tuple[int, ...] = (), repeat: tuple[int, ...] = (), prefix: str = "slice",
                 shift: dict[int, float] | None = None, lean: float = 0.0,
                 pixel_spacing: dict[int, tuple[float, float]] | None = None, decimals: int = 6,
                 tags: dict[str, str] | None = None) -> Path:
    """One DICOM file per slice with the tags a scanner writes; `skip` drops slices,
    `repeat` writes a slice twice under another instance number, `shift` moves slice k's
    position by that many mm along the slice normal (non-uniform spacing), `lean` moves slice k
    by k * lean mm along the column direction (a gantry tilt of atan(lean / slice spacing) with
    the orientation kept: a sheared stack), `pixel_spacing` gives slice k another PixelSpacing
    (between rows, between columns), `decimals` rounds ImagePositionPatient, `tags` adds or
    replaces tags ("gggg|eeee": value) in every slice."""
    folder.mkdir(parents=True, exist_ok=True)
    d = img.GetDirection()
    sp = img.GetSpacing()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    slices = [i for i in range(img.GetDepth()) if i not in skip] + list(repeat)
    for n, k in enumerate(slices):
        s = img[:, :, k]
        rows_cols = (pixel_spacing or {}).get(k, (sp[1], sp[0]))
        s.SetSpacing((rows_cols[1], rows_cols[0]))
        at = np.add(img.TransformIndexToPhysicalPoint((0, 0, k)), np.multiply(d[2::3], (shift or {}).get(k, 0.0)))
        for tag, value in {
            "0008|0060": "CT", "0020|000d": uid.rsplit(".", 1)[0], "0020|000e": uid,
            "0008|0018": f"{uid}.{n + 1}", "0020|0013": str(n + 1),
            "0020|0032": "\\".join(f"{v:.{decimals}f}" for v in np.add(at, np.multiply(d[1::3], k * lean))),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0028|0030": f"{rows_cols[0]}\\{rows_cols[1]}", "0018|0050": str(sp[2]), **(tags or {}),
        }.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}_{n:03d}.dcm"))
        writer.Execute(s)
    return folder


def test_dicom_to_nifti_affine_maps_voxels_to_ras_positions(tmp_path):
    img = volume()
    out = dicom_series_to_nifti(write_series(tmp_path / "ct", img), tmp_path / "ct.nii.gz")
    nii = nib.load(out)
    assert nii.shape == (7, 6, 5)
    for ijk in [(0, 0, 0), (6, 0, 0), (0, 5, 0), (3, 2, 4), (6, 5, 4)]:
        lps = np.array(img.TransformIndexToPhysicalPoint(ijk))
        ras = nii.affine @ [*ijk, 1]
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-4)
        assert nii.dataobj[ijk] == sitk.GetArrayViewFromImage(img)[ijk[::-1]]
    np.testing.assert_allclose(nii.header.get_zooms(), SPACING, atol=1e-5)
    assert nii.header["qform_code"] == nii.header["sform_code"] == 1
    # SimpleITK's own NIfTI writer agrees, and so does the header-only geometry
    sitk.WriteImage(sitk.ReadImage(sorted(map(str, (tmp_path / "ct").iterdir()))), str(tmp_path / "ref.nii.gz"))
    np.testing.assert_allclose(nib.load(tmp_path / "ref.nii.gz").affine, nii.affine, atol=1e-4)
    np.testing.assert_allclose(read_header(tmp_path / "ct")["affine"], nii.affine, atol=1e-4)


def test_find_studies_lists_nifti_files_and_dicom_series_folders(tmp_path):
    root = tmp_path / "incoming"
    write_series(root / "patient7" / "ct_head", volume())
    (root / "sub").mkdir(parents=True)
    for rel in ("a.nii.gz", "sub/b.nii"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.float32), np.diag([0.9, 0.9, 3.0, 1])), str(root / rel))
    (root / ".hidden.nii.gz").write_bytes(b"junk")
    (root / "notes.txt").write_text("not a study")
    found = find_studies(root)
    assert found == [
        {"id": "a", "image": str(root / "a.nii.gz")},
        {"id": "patient7_ct_head", "image": str(root / "patient7/ct_head")},
        {"id": "sub_b", "image": str(root / "sub/b.nii")},
    ]
    for study in found:
        read_header(study["image"])


def _mixed(folder):
    write_series(folder, volume(), uid="1.2.3.4.5.1")
    write_series(folder / "_", volume(), uid="1.2.3.4.5.2")
    for f in (folder / "_").iterdir():
        f.rename(folder / f"other_{f.name}")
    (folder / "_").rmdir()
    return "2 DICOM image series mixed in one folder"


def _missing_middle(folder):
    write_series(folder, volume(), skip=(2,))
    return "incomplete series: 5 mm gap after slice 1"


def _mixed_sizes(folder):
    write_series(folder, volume())
    write_series(folder / "_", volume((5, 6, 8)))
    (folder / "_" / "slice_004.dcm").rename(folder / "slice_999.dcm")
    shutil.rmtree(folder / "_")
    return "mixes slice sizes or orientations"


def _duplicate(folder):
    write_series(folder, volume(), repeat=(2,))
    return "duplicate slice position"


@pytest.mark.parametrize("make", [_mixed, _missing_middle, _mixed_sizes, _duplicate])
def test_mixed_and_incomplete_series_are_refused(tmp_path, make):
    folder = tmp_path / "series"
    problem = make(folder)
    with pytest.raises(InputError, match=problem) as e:
        find_studies(tmp_path)
    assert str(e.value).startswith(f"{folder}: ") and "\n" not in str(e.value)
    with pytest.raises(InputError, match=problem):
        read_header(folder)


SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _study_folder(folder: Path, *, localizer: bool = True, capture: bool = True, second: bool = False) -> Path:
    """A CT series (series 2, 5 slices) with, as a whole-study export leaves them in one folder,
    a one-image scout (ImageType LOCALIZER), a dose screenshot (Secondary Capture) and, with
    ``second``, another reconstruction (series 3)."""
    write_series(folder, volume(), uid="1.2.3.9.2", tags={"0020|0011": "2", "0008|103e": "Thorax 1.0 B31f"})
    if second:
        write_series(folder, volume(), uid="1.2.3.9.3", prefix="recon",
                     tags={"0020|0011": "3", "0008|103e": "Thorax 3.0 Br40"})
    if localizer:
        write_series(folder, volume((1, 6, 7)), uid="1.2.3.9.1", prefix="scout",
                     tags={"0020|0011": "1", "0008|103e": "Topogram", "0008|0008": "ORIGINAL\\PRIMARY\\LOCALIZER"})
    if capture:
        write_series(folder, volume((1, 6, 7)), uid="1.2.3.9.900", prefix="dose",
                     tags={"0020|0011": "900", "0008|103e": "Dose Report", "0008|0016": SECONDARY_CAPTURE,
                           "0008|0008": "DERIVED\\SECONDARY"})
    return folder


def test_a_scout_and_a_dose_screenshot_beside_a_series_are_left_out(tmp_path, caplog):
    """A whole CT study exported into one folder: the scout and the dose report are not a second
    series to refuse the study for; the CT is read, and the log names what was left out."""
    from pipeline.dicom_series import dicom_series

    folder = _study_folder(tmp_path / "study")
    assert pydicom_tag(folder / "dose_000.dcm", "SOPClassUID") == SECONDARY_CAPTURE  # the writer kept it
    with caplog.at_level("INFO", logger="pipeline.dicom_series"):
        series = dicom_series(folder)
    assert series["uid"] == "1.2.3.9.2" and series["size"] == (7, 6, 5)
    assert 'localizer series 1 "Topogram" (CT, 1 file)' in caplog.text
    assert 'Secondary Capture series 900 "Dose Report" (CT, 1 file)' in caplog.text
    with caplog.at_level("INFO", logger="pipeline.dicom_series"):
        assert read_header(folder)["shape"] == (7, 6, 5)
        dicom_series(folder)
    assert caplog.text.count("reading the image series") == 1  # a predict reads a folder 4 times: said once
    # alone (a folder per series), a scout or a single screenshot is nothing to segment: refused, not
    # segmented as junk; a Secondary Capture volume (as some converters write one) is read
    for name, problem in (("scout", 'only a localizer (scout) series (series 1 "Topogram" (CT, 1 file))'),
                          ("dose", 'only a single Secondary Capture image (series 900 "Dose Report" (CT, 1 file))')):
        alone = tmp_path / name
        alone.mkdir()
        for f in folder.glob(f"{name}_*.dcm"):
            shutil.copy(f, alone / f.name)
        with pytest.raises(InputError, match=re.escape(f"{alone}: {problem}")):
            read_header(alone)
    volume_sc = write_series(tmp_path / "sc_volume", volume(), uid="1.2.3.9.901", tags={"0008|0016": SECONDARY_CAPTURE})
    assert read_header(volume_sc)["shape"] == (7, 6, 5)


def test_two_reconstructions_in_one_folder_are_named_as_a_viewer_shows_them(tmp_path):
    folder = _study_folder(tmp_path / "study", second=True)
    with pytest.raises(InputError) as e:
        read_header(folder)
    assert str(e.value) == (f'{folder}: 2 DICOM image series mixed in one folder (series 2 "Thorax 1.0 B31f" (CT, 5 '
                            'files); series 3 "Thorax 3.0 Br40" (CT, 5 files)); put each series in a folder of its own')


def pydicom_tag(file: Path, keyword: str) -> str:
    import pydicom

    return str(pydicom.dcmread(file, stop_before_pixels=True).get(keyword, ""))


def _manifest(root: Path, image: Path, shape: tuple[int, ...]) -> Path:
    """A one-entry manifest: ``image`` with an all-ones label of ``shape`` beside it."""
    nib.save(nib.Nifti1Image(np.ones(shape, np.uint8), np.eye(4)), str(root / "label.nii.gz"))
    doc = {"labels": {"0": "background", "1": "organ"},
           "training": [{"image": f"./{image.relative_to(root)}", "label": "./label.nii.gz"}]}
    (root / "dataset.json").write_text(json.dumps(doc))
    return root / "dataset.json"


def test_a_gantry_tilted_series_is_refused_naming_the_tilt(tmp_path):
    """Gantry tilt: the slices advance along the table (here 2.5 mm down the normal and 0.91 mm
    along the columns per slice), not along the normal of their orientation. SimpleITK stacks them
    along the normal, so slice k would be misplaced by k * 0.91 mm; refused, from the headers."""
    folder = write_series(tmp_path / "images" / "tilted", volume(), lean=2.5 * np.tan(np.deg2rad(20)))
    problem = (r"gantry-tilted series: slices advance 20 degrees off the slice normal \(slice_004.dcm lies "
               r"3.64 mm off it in-plane, more than the 0.1 mm tolerated\).*"
               r"resample it to an untilted grid first \(e.g. dcm2niix")
    with pytest.raises(InputError, match=problem) as e:
        read_header(folder)
    assert str(e.value).startswith(f"{folder}: ") and "\n" not in str(e.value)
    with pytest.raises(InputError, match=problem):
        find_studies(tmp_path / "images")
    [line] = validate(_manifest(tmp_path, folder, (7, 6, 5)))
    assert line.startswith(f"training[0] tilted: image {folder}: gantry-tilted series")
    # a drift of less than 0.1 mm over the series is rounding, not a tilt
    assert read_header(write_series(tmp_path / "straight", volume(), lean=0.09 / 4))["shape"] == (7, 6, 5)
    # a small drift beyond it, with positions written with 6 decimals, is named a shear
    with pytest.raises(InputError, match=r"sheared series: slices advance 0.688 degrees .* lies 0.12 mm off"):
        read_header(write_series(tmp_path / "drift", volume(), lean=0.03))
    # written with 1 decimal, as much could be rounding (0.17 mm along an oblique axis): accepted
    assert read_header(write_series(tmp_path / "rounded", volume(), lean=0.03, decimals=1))["shape"] == (7, 6, 5)


def test_mixed_pixel_spacings_in_one_series_are_refused(tmp_path):
    folder = write_series(tmp_path / "ct", volume(), pixel_spacing={3: (0.6, 0.6), 4: (0.6, 0.6)})
    with pytest.raises(InputError, match=r"mixes pixel spacings 0.8 x 0.7 and 0.6 x 0.6 mm \(slice_00[34].dcm\)") as e:
        read_header(folder)
    assert str(e.value).startswith(f"{folder}: ") and "\n" not in str(e.value)
    # spacings written with other decimals are one spacing
    same = write_series(tmp_path / "same", volume(), pixel_spacing={3: (0.80001, 0.69999)})
    np.testing.assert_allclose(read_header(same)["pixdim"], SPACING, atol=1e-4)


@pytest.mark.parametrize("decimals", [1, 2])
def test_uniform_thin_slices_written_with_few_decimals_are_accepted(tmp_path, decimals):
    """0.625 mm slices whose positions are written with 2 (or 1) decimals have gaps of 0.62 and
    0.63 mm (0.6 and 0.7 mm), uniform to within the rounding: accepted, spaced first to last."""
    folder = write_series(tmp_path / "ct", volume((24, 6, 7), spacing=(0.7, 0.8, 0.625)), decimals=decimals)
    header = read_header(folder)
    assert header["shape"] == (7, 6, 24) and abs(header["pixdim"][2] - 0.625) < 0.1 / 23
    nii = nib.load(dicom_series_to_nifti(folder, tmp_path / "ct.nii.gz"))
    np.testing.assert_allclose(nii.affine, header["affine"], atol=1e-4)


def test_small_gap_differences_adding_up_along_a_series_are_refused(tmp_path):
    """Gaps of 2.5 mm, then 2.524 mm (each within 1% of the other): SimpleITK would stack the
    slices 2.512 mm apart, slice 29 0.35 mm (0.14 slices) off its position. A series is checked
    slice by slice against that uniform grid, so this is refused from its headers, not after
    inference by the DICOM SEG writer; a smaller drift (0.1 mm) passes."""
    shift = {k: 0.024 * (k - 29) for k in range(30, 60)}
    folder = write_series(tmp_path / "ct", volume((60, 6, 7)), shift=shift)
    with pytest.raises(InputError, match=r"non-uniform slice spacing: gaps of 2.5 to 2.524 mm add up to "
                                         r"slice_029.dcm \(slice 29\) lying 0.354 mm off the uniform 2.512 mm grid") as e:
        read_header(folder)
    assert str(e.value).startswith(f"{folder}: ") and "\n" not in str(e.value)
    small = write_series(tmp_path / "small", volume((60, 6, 7)), shift={k: 0.007 * (k - 29) for k in range(30, 60)})
    assert read_header(small)["shape"] == (7, 6, 60)


def test_dicom_series_entries_validate_against_nifti_labels(tmp_path):
    write_series(tmp_path / "imagesTr" / "ct1", volume())
    label = np.zeros((7, 6, 5), np.uint8)
    label[2:5, 2:4, 1:4] = 1
    affine = read_header(tmp_path / "imagesTr" / "ct1")["affine"]
    (tmp_path / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "labelsTr/ct1.nii.gz"))
    doc = {"labels": {"0": "background", "1": "organ"},
           "training": [{"image": "./imagesTr/ct1", "label": "./labelsTr/ct1.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(doc))
    assert validate(tmp_path / "dataset.json") == []
    nib.save(nib.Nifti1Image(label[:, :, :4], affine), str(tmp_path / "labelsTr/ct1.nii.gz"))
    [line] = validate(tmp_path / "dataset.json")
    assert line == (f"training[0] ct1: image {tmp_path / 'imagesTr/ct1'} shape (7, 6, 5) != label "
                    f"{tmp_path / 'labelsTr/ct1.nii.gz'} shape (7, 6, 4)")
    shutil.rmtree(tmp_path / "imagesTr" / "ct1")
    write_series(tmp_path / "imagesTr" / "ct1", volume(), skip=(1,))
    [line] = validate(tmp_path / "dataset.json")
    assert line.startswith(f"training[0] ct1: image {tmp_path / 'imagesTr/ct1'}: incomplete series")


def test_single_slice_series_and_voxel_cap(tmp_path):
    folder = write_series(tmp_path / "scout", volume((1, 6, 7)))
    header = read_header(folder)
    assert header["shape"] == (7, 6, 1) and header["format"] == "dicom"
    with pytest.raises(InputError, match=r"header claims 42 voxels \(7, 6, 1\), more than the limit of 40"):
        read_header(folder, max_voxels=40)
    with pytest.raises(InputError, match="no DICOM series in folder"):
        read_header(tmp_path)


# -- one file per channel (nnU-Net v2 layout) --------------------------------------------------------------

def _channel_files(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.array([[-0.8, 0, 0, 10.0], [0, -0.8, 0, 5.0], [0, 0, 2.5, -3.0], [0, 0, 0, 1]])
    for n in names:
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.float32), affine), folder / n)


def test_channel_files_are_one_study_for_a_multi_channel_bundle(tmp_path):
    _channel_files(tmp_path, ["a_0001.nii.gz", "a_0000.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz", "c.nii.gz"])
    two = find_studies(tmp_path, channels=2)
    assert [s["id"] for s in two] == ["a", "b", "c"]
    assert two[0]["image"] == [str(tmp_path / "a_0000.nii.gz"), str(tmp_path / "a_0001.nii.gz")]  # channel order
    assert two[2]["image"] == str(tmp_path / "c.nii.gz") and not any("problem" in s for s in two)
    one = find_studies(tmp_path)  # a one-channel bundle: every file is a study, as before
    assert [s["id"] for s in one] == ["a_0000", "a_0001", "b_0000", "b_0001", "c"]


def test_a_case_missing_a_channel_file_is_refused_or_listed_with_its_problem(tmp_path):
    _channel_files(tmp_path, ["a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0002.nii.gz"])
    with pytest.raises(InputError, match=r"case 'b' has channel files \[0, 2\], a 2-channel bundle needs 0..1"):
        find_studies(tmp_path, channels=2)
    a, b = find_studies(tmp_path, strict=False, channels=2)
    assert "problem" not in a and "b_0000.nii.gz, b_0002.nii.gz" in b["problem"] and str(tmp_path) in b["problem"]


def test_two_files_of_one_study_id_are_refused_or_listed_with_their_problem(tmp_path):
    """a.nii beside a.nii.gz would write one mask for two studies: in batch work that study fails
    alone (listed with its problem), the others go on."""
    _channel_files(tmp_path, ["a.nii.gz", "b.nii.gz"])
    (tmp_path / "a.nii").write_bytes(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)).to_bytes())
    with pytest.raises(InputError, match="study id 'a' is also"):
        find_studies(tmp_path)
    a, b = find_studies(tmp_path, strict=False)
    assert a["id"] == "a" and "study id 'a' is also" in a["problem"] and "problem" not in b
    (tmp_path / "x_y").mkdir()  # three inputs of one id: each is named (before, the third went unsaid)
    (tmp_path / "x").mkdir()
    for f in (tmp_path / "x_y" / "z.nii.gz", tmp_path / "x" / "y_z.nii.gz", tmp_path / "x_y_z.nii.gz"):
        f.write_bytes((tmp_path / "b.nii.gz").read_bytes())
    xyz = {s["id"]: s for s in find_studies(tmp_path, strict=False)}["x_y_z"]
    assert all(str(f) in xyz["problem"] for f in (tmp_path / "x_y" / "z.nii.gz", tmp_path / "x" / "y_z.nii.gz",
                                                  tmp_path / "x_y_z.nii.gz")), xyz["problem"]


def test_numbered_cases_that_cannot_be_channel_files_stay_studies(tmp_path):
    _channel_files(tmp_path, ["BRATS_0001.nii.gz", "BRATS_0002.nii.gz", "BRATS_0003.nii.gz"])  # 4D images
    assert [s["id"] for s in find_studies(tmp_path, channels=2)] == ["BRATS_0001", "BRATS_0002", "BRATS_0003"]


def test_a_folder_of_case_0000_files_is_nnunets_one_channel_layout(tmp_path):
    _channel_files(tmp_path / "nn", ["a_0000.nii.gz", "b_0000.nii.gz"])
    assert find_studies(tmp_path / "nn") == [{"id": "a", "image": str(tmp_path / "nn/a_0000.nii.gz")},
                                             {"id": "b", "image": str(tmp_path / "nn/b_0000.nii.gz")}]
    _channel_files(tmp_path / "mixed", ["a_0000.nii.gz", "b.nii.gz"])  # not every file: names kept
    assert [s["id"] for s in find_studies(tmp_path / "mixed")] == ["a_0000", "b"]


def test_a_bundle_run_reads_the_series_segpipe_predict_reads(tmp_path):
    """``python -m monai.bundle run`` loads studies through ``StudyStream``: a whole-study folder (a
    CT, its scout and a dose screenshot) gave MONAI's loader every file ("all input arrays must have
    the same shape") where segpipe predict reads the CT. Now the same series is read, through a
    temporary NIfTI that is gone after the run; a folder that fails is left out naming its problem."""
    from monai.transforms import LoadImaged

    from pipeline.predict_io import StudyStream

    folder = _study_folder(tmp_path / "study")
    write_series(tmp_path / "mixed" / "a", volume(), uid="1.2.3.9.7")
    write_series(tmp_path / "mixed" / "a", volume(), uid="1.2.3.9.8", prefix="other")
    stream = StudyStream([{"image": str(folder), "id": "study"}, {"image": str(tmp_path / "mixed" / "a"), "id": "bad"}],
                         LoadImaged("image", image_only=False))
    items = list(stream)
    assert [tuple(d["image"].shape) for d in items] == [read_header(folder)["shape"]]
    np.testing.assert_allclose(items[0]["image"].affine.numpy(), read_header(folder)["affine"], atol=1e-4)
    assert not Path(items[0]["image"].meta["filename_or_obj"]).exists()  # the temporary NIfTI is gone
    assert stream.failed == [f"{tmp_path / 'mixed' / 'a'}: 2 DICOM image series mixed in one folder (series "
                             "1.2.3.9.7 (CT, 5 files); series 1.2.3.9.8 (CT, 5 files)); put each series in a folder of "
                             "its own"]


def _object_without_pixels(path: Path, sop_class: str, series_uid: str) -> None:
    """A DICOM file of ``sop_class`` with no pixel data (an RT structure set, a report), as pydicom
    writes one with its meta header."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, sop_class, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.Modality = series_uid, "RTSTRUCT"
    ds.save_as(path, enforce_file_format=True)


def test_objects_without_pixels_beside_a_series_are_no_damaged_slices(tmp_path):
    """An RT structure set, a structured report and a DICOMDIR start as DICOM and GDCM groups them in
    no series (no pixel data); they were left out, and must not be taken for slices cut short (a
    radiotherapy export holds them beside its CT). A slice cut short still is one."""
    from pipeline.dicom_series import dicom_series

    folder = write_series(tmp_path / "ct", volume())
    _object_without_pixels(folder / "rtstruct.dcm", "1.2.840.10008.5.1.4.1.1.481.3", "1.2.3.77")
    _object_without_pixels(folder / "sr.dcm", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.3.78")
    _object_without_pixels(folder / "DICOMDIR", "1.2.840.10008.1.3.10", "1.2.3.79")
    assert dicom_series(folder)["size"] == (7, 6, 5)
    cut = sorted(folder.glob("slice_*.dcm"))[-1]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with pytest.raises(InputError, match=f"{cut.name} cannot be read: DICOM file cut short"):
        dicom_series(folder)
