"""The output formats of ``segpipe predict``: which files a study gets, and the extra ones.

``--format nifti`` (the default) keeps ``<id>.nii.gz``, written by the bundle's own
post-processing (``pipeline.postprocess.SaveMaskd``, the one NIfTI writer); ``dicom-seg`` keeps
``<id>.seg.dcm`` (``pipeline.dicom_seg``) instead, ``both`` keeps both; ``--preview`` adds
``<id>_preview.png`` (``pipeline.preview``). A study is finished, and skipped by a rerun, when
every file it should get exists; each is written atomically, and a study that fails after its
mask was written loses the files of this attempt, so a failed study leaves nothing.

Only a DICOM series study can have a SEG (it references the source images): with
``dicom-seg`` a NIfTI study fails with that reason before it is read; with ``both`` it gets
its NIfTI mask, and its row's ``error`` says why there is no SEG.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from pipeline.errors import InputError, UsageError, first_line

log = logging.getLogger(__name__)

FORMATS = ("nifti", "dicom-seg", "both")


def check_format(output_format: str) -> str:
    if output_format not in FORMATS:
        raise UsageError(f"--format {output_format!r}: choose one of {', '.join(FORMATS)}")
    return output_format


def dicom_folder(study: Mapping[str, Any]) -> Path | None:
    """The DICOM series folder of a study (its first channel's), or None for NIfTI files."""
    image = study["image"][0] if isinstance(study["image"], list) and study["image"] else study["image"]
    return Path(image) if isinstance(image, str) and Path(image).is_dir() else None


def planned(study: Mapping[str, Any], output_dir: Path, output_format: str, preview: bool) -> dict[str, Path]:
    """The files this study should end with: ``{"output": mask, "seg": SEG, "preview": PNG}``
    (the keys that apply; report.csv columns of the same names)."""
    sid, out = study["id"], Path(output_dir)
    files = {}
    if output_format in ("nifti", "both"):
        files["output"] = out / f"{sid}.nii.gz"
    if output_format == "dicom-seg" or (output_format == "both" and dicom_folder(study) is not None):
        files["seg"] = out / f"{sid}.seg.dcm"
    if preview:
        files["preview"] = out / f"{sid}_preview.png"
    return files


def recount_volumes(files: Mapping[str, Path], names: Sequence[str]) -> dict[str, float | int]:
    """``voxels_<name>`` and ``ml_<name>`` (``mm2_`` for a 2D mask) counted from a finished study's NIfTI mask, else its
    binary DICOM SEG: for the row of a study a rerun skips when the earlier report has none (a run
    killed between a mask and its row, or a deleted report.csv). {} for a fractional SEG (it holds
    probabilities, not the mask) or a file that cannot be read (logged)."""
    from pipeline.postprocess import label_volumes, voxel_size

    try:
        prefix = "ml"
        if "output" in files:
            img = nib.load(files["output"])
            labels = np.asarray(img.dataobj)
            prefix, voxel_ml = voxel_size(img.affine, 2 if labels.squeeze().ndim == 2 else 3)
        elif "seg" in files:
            import highdicom as hd

            seg = hd.seg.segread(files["seg"])
            if seg.SegmentationType != "BINARY":
                return {}
            volume = seg.get_volume(combine_segments=True)
            labels, voxel_ml = volume.array, float(volume.voxel_volume) / 1000
        else:
            return {}
        labels = np.ascontiguousarray(labels)  # uint8 as written; label_volumes widens anything else itself
        return label_volumes(torch.from_numpy(labels if labels.dtype == np.uint8 else labels.astype(np.int64)),
                             names, voxel_ml, prefix)
    except Exception as e:  # noqa: BLE001 - the study stays skipped; only its volume cells stay empty
        log.warning("%s: cannot count its label volumes (%s)", next(iter(files.values())), first_line(e)[:120])
        return {}


def columns(study: Mapping[str, Any], files: Mapping[str, Path], output_format: str) -> dict[str, str]:
    """The report.csv cells of a finished study: ``output`` (the NIfTI mask, "" when not
    kept), ``seg`` (unless --format nifti), ``preview`` (with --preview), ``error`` (:func:`note`)."""
    cells = {"output": str(files.get("output", ""))}
    if output_format != "nifti":
        cells["seg"] = str(files.get("seg", ""))
    if "preview" in files:
        cells["preview"] = str(files["preview"])
    return {**cells, "error": note(study, output_format)}


def note(study: Mapping[str, Any], output_format: str) -> str:
    """The row's explanation when ``both`` cannot give this study a SEG, else ""."""
    if output_format == "both" and dicom_folder(study) is None:
        return f"no DICOM SEG: {_name(study)} is not a DICOM series (no source images to reference); NIfTI mask only"
    return ""


def _name(study: Mapping[str, Any]) -> str:
    image = study["image"]
    return str(image[0] if isinstance(image, list) and image else image)


def read_sources(study: Mapping[str, Any], output_format: str) -> list[Any] | None:
    """The source DICOM headers a SEG will reference (read in the reader thread, so a series a
    SEG cannot reference fails before the model runs), or None when no SEG is written."""
    if output_format == "nifti":
        return None
    folder = dicom_folder(study)
    if folder is None:
        if output_format == "dicom-seg":
            raise InputError(f"{_name(study)}: not a DICOM series, so no DICOM SEG can reference its images; "
                             "use --format nifti or both")
        return None
    from pipeline.dicom_seg import source_datasets

    return source_datasets(folder)


def write_extras(study: Mapping[str, Any], data: Mapping[str, Any], post: Mapping[str, Any],
                 volumes: Mapping[str, Any], model: Mapping[str, Any], output_format: str,
                 preview: bool) -> dict[str, str]:
    """After the bundle's post-processing ``post`` wrote ``post["output"]`` (the NIfTI mask):
    the SEG and the preview this study should get, and the NIfTI removed unless kept. Returns
    the row's output columns. On failure every file of this attempt is removed, then it raises."""
    mask = Path(post["output"])
    files = planned(study, mask.parent, output_format, preview)
    written = [mask]
    try:
        labels = torch.as_tensor(post["pred"])[0].numpy()
        affine = np.asarray(data["image"].meta["original_affine"], dtype=float)
        names = list(model["label_names"])
        if "seg" in files:
            from pipeline.dicom_seg import write_dicom_seg
            from pipeline.preview import label_colours

            probs = post.get("pred_probabilities")
            written.append(files["seg"])
            write_dicom_seg(labels, affine, data["dicom_sources"], files["seg"], names, model.get("metadata", {}),
                            probabilities=None if probs is None else torch.as_tensor(probs).numpy(),
                            colours=label_colours(len(names)))
        if "preview" in files:
            from pipeline.preview import write_preview

            written.append(files["preview"])
            from pipeline.postprocess import SIZE_COLUMNS

            prefix, unit = next(((p, u) for p, u in SIZE_COLUMNS.values() if any(k.startswith(f"{p}_") for k in volumes)),
                                SIZE_COLUMNS[3])
            write_preview(data["source"], labels, affine, names, {n: volumes.get(f"{prefix}_{n}", 0.0) for n in names},
                          files["preview"], title=str(study["id"]), unit=unit)
    except BaseException:
        for f in written:
            f.unlink(missing_ok=True)
        raise
    if "output" not in files:
        mask.unlink(missing_ok=True)
    return columns(study, files, output_format)
