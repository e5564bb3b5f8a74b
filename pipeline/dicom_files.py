"""DICOM files before they are a series: GDCM's grouping without its raw warnings, and the files
it groups in no series although they look like slices of one (cut short or damaged in an export)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_ITK_QUIET = threading.Lock()


@contextmanager
def quiet_itk() -> Iterator[None]:
    """ITK's warnings off: GDCM prints three raw lines ("No Series were found") for every folder
    without DICOM files, which for us is an answer, not a problem. One thread at a time (the
    setting is global; predict reads and writes studies in threads of their own)."""
    import SimpleITK as sitk

    with _ITK_QUIET:
        was = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        try:
            yield
        finally:
            sitk.ProcessObject.SetGlobalWarningDisplay(was)


def series_ids(folder: Path) -> tuple[str, ...]:
    """The SeriesInstanceUIDs of the DICOM files directly in ``folder`` (GDCM's grouping); () for none."""
    import SimpleITK as sitk

    with quiet_itk():
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


#: MediaStorageSOPClassUID of a DICOMDIR: a DICOM file that belongs to no series
MEDIA_DIRECTORY_SOP = "1.2.840.10008.1.3.10"


def starts_as_dicom(path: Path) -> bool:
    """Whether the file has DICOM's "DICM" marker at byte 128 (an unreadable file: no)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def sop_class(file: str | Path) -> str | None:
    """The MediaStorageSOPClassUID of a DICOM file's meta header (the first bytes: a file cut short
    keeps it), or None where that header cannot be read."""
    import pydicom

    try:
        return str(pydicom.filereader.read_file_meta_info(file).get("MediaStorageSOPClassUID", ""))
    except Exception:  # noqa: BLE001 - pydicom's errors for a damaged header are of several kinds
        return None


def damaged_files(folder: Path, members: set[str], image_sops: set[str | None]) -> list[str]:
    """Names of the files in ``folder`` that GDCM put in no series (``members``: the names it did)
    although they start as DICOM and are of the SOP class of a series there (``image_sops``), or
    whose meta header cannot be read: a slice cut short or damaged in the export, which would
    otherwise be left out without a word (a gap in the stack, or at either end a stack one slice
    shorter). An object of another class (an RT structure set, a report, a presentation state: no
    pixel data, so GDCM groups it in no series) and a DICOMDIR are left alone."""
    bad = []
    for f in sorted(folder.iterdir()):
        if f.name in members or f.name.startswith(".") or not f.is_file() or not starts_as_dicom(f):
            continue
        sop = sop_class(f)
        if sop is None or (sop in image_sops and sop != MEDIA_DIRECTORY_SOP):
            bad.append(f.name)
    return bad
