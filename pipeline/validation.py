"""Validate a manifest: every problem of every entry, one line each, never a crash.

Per file: the header checks of ``pipeline.studies.read_header`` (missing, unreadable, not
NIfTI/DICOM, empty, truncated, bad spacing, absurd voxel count), then the dimensionality the
manifest expects (``tensorImageSize``; a last axis of as many channels as ``modality`` /
``channel_names`` is fine), then the voxel values, read once: NaN or Inf voxels; for labels also
non-integer values (a float label within ``LABEL_ROUNDING`` of an integer is that integer, as
:func:`pipeline.fileio.read_label` rounds it) and values not declared in ``labels``. An all-background label is a valid
case (a study without the structures, as nnU-Net's datasets have): it is logged, not a problem,
unless every labelled case is all background (nothing to learn). An image given as
a list of files (one per channel) must list one file per declared channel, each without a channel
axis, all of one shape and affine. Per training entry: image and label must share spatial shape
and affine (within ``AFFINE_ATOL`` mm / ``AFFINE_RTOL``). Lines read
``training[3] case_004: label /abs/labelsTr/case_004.nii.gz: problem``.

Voxel spacing (the header's, in mm, per spatial axis): a spacing that is not finite or not
positive (``pipeline.studies.read_header``), or outside ``SPACING_MIN_MM``..``SPACING_MAX_MM``
(1 nm to 100 mm: electron microscopy pixels are a few nm, light microscopy ~1e-4 mm, CT/MR voxels
0.2-10 mm; beyond is a unit or header error) is a problem. Across the dataset, in the bundles'
(RAS) axis order, a case whose spacing along an axis is more than ``SPACING_OUTLIER`` (10) times
finer or coarser than the training cases' median along that axis is a warning (logged, as the
planner plans for the median), and so is a case whose image, resampled to the target spacing
``segpipe plan`` would choose (:func:`pipeline.fingerprint.target_spacing`), would take more than
``RESAMPLE_WARN_BYTES`` as float32: both lines name the case and that memory.
``require_valid(manifest)``: InputError (one line, the first problem) unless the manifest is clean;
the other problems are logged once each.

``check_contract(bundle_dir, manifest)``: the manifest's label names and channel count against
the bundle's ``configs/metadata.json`` (``network_data_format``), one line naming both sides.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bundle import bundle_metadata
from pipeline.dicom_series import read_dicom_series
from pipeline.errors import InputError, UsageError, first_line
from pipeline.fileio import LABEL_ROUNDING
from pipeline.manifest import parse_manifest
from pipeline.studies import is_nifti, read_header

log = logging.getLogger(__name__)

AFFINE_ATOL = 1e-3  # mm
AFFINE_RTOL = 1e-4
EMPTY_LABEL = "label is empty (all background)"
SPACING_MIN_MM = 1e-6  # 1 nm: electron microscopy; light microscopy in mm is ~1e-4 (cells_2d's nominal 0.5)
SPACING_MAX_MM = 100.0  # a 10 cm voxel is no image: CT slices are <= 10 mm, PET/SPECT voxels ~2-6 mm
SPACING_OUTLIER = 10.0  # a case's spacing along an axis this many times off the median: a warning
RESAMPLE_WARN_BYTES = 4 * 2**30  # a case whose float32 image at the target spacing takes more: a warning


def validate_manifest(path: Path, allow_outside: bool = False) -> list[str]:
    """Every problem of the manifest at ``path`` and of its files, one line each ([] when clean)."""
    try:
        data, problems = parse_manifest(Path(path), allow_outside)
    except InputError as e:
        return [str(e)]
    expect = {
        "spatial": 2 if str(data.get("tensorImageSize", "3D")).upper() == "2D" else 3,
        "channels": len(data.get("modality") or data.get("channel_names") or {}) or 1,
        "labels": {int(k) for k in data["labels"]},
    }
    if data.get("lateral_pairs") is not None:  # the optional declaration of left/right label pairs
        from pipeline.laterality import declared_pairs

        try:
            declared_pairs(data["lateral_pairs"], [data["labels"][k] for k in sorted(data["labels"], key=int)],
                           str(path))
        except InputError as e:
            problems.append(str(e))
    geometry: list[tuple[str, str, str, dict[str, Any]]] = []  # (role, where, image file, header) of good images
    for role in ("training", "test"):
        for i, entry in enumerate(data[role]):
            where = f"{role}[{i}] {entry['id']}"
            try:
                found, header = _check_entry(entry, expect)
                problems += [f"{where}: {p}" for p in found]
            except Exception as e:  # noqa: BLE001 - validate reports, it never crashes
                log.debug("unexpected error on %s", where, exc_info=True)
                problems.append(f"{where}: {entry.get('image')}: unexpected error {type(e).__name__}: {e}")
                continue
            if header is not None:
                image = entry["image"][0] if isinstance(entry["image"], list) else entry["image"]
                geometry.append((role, where, image, header))
    try:
        warnings = spacing_warnings(geometry, expect["spatial"], expect["channels"])
    except Exception:  # noqa: BLE001 - a warning's arithmetic never stops validate
        log.debug("spacing warnings of %s failed", path, exc_info=True)
        warnings = []
    for w in warnings:
        log.warning("%s: %s", path, w)
    problems = _empty_labels(problems, sum(bool(e.get("label")) for e in data["training"]), path)
    log.info("validated %s: %d training, %d test entries, %d problem(s)",
             path, len(data["training"]), len(data["test"]), len(problems))
    return problems


def require_valid(path: Path, allow_outside: bool = False) -> None:
    """InputError, one line naming the first problem and how many there are, unless the manifest at
    ``path`` validates clean; the other problems are logged (error), so each is said once."""
    problems = validate_manifest(Path(path), allow_outside)
    for i, p in enumerate(problems[1:], start=2):  # numbered: read above the error line, which names the first
        log.error("problem %d of %d: %s", i, len(problems), p)
    if problems:
        first = problems[0].removeprefix(f"{path}: ")  # the manifest is named once
        raise InputError(f"{path}: failed validation with {len(problems)} problem(s), first: {first}")


def _ras_spacing(header: dict[str, Any], n: int) -> tuple[list[float], list[int]]:
    """(spacing, shape) of the first ``n`` axes of a header, in the bundles' (RAS) axis order."""
    from pipeline.fingerprint import ras_order

    order = ras_order(header["affine"], n)
    pixdim = list(header["pixdim"]) + [1.0] * (n - len(header["pixdim"]))
    return [round(float(pixdim[a]), 6) for a in order], [int(header["shape"][a]) for a in order]


def spacing_warnings(geometry: list[tuple[str, str, str, dict[str, Any]]], n: int, channels: int = 1) -> list[str]:
    """Warning lines for the images of ``geometry`` ((role, where, file, header) each): a spacing more
    than ``SPACING_OUTLIER`` times off the training median along an axis, and a float32 image at the
    target spacing ``segpipe plan`` would choose larger than ``RESAMPLE_WARN_BYTES``; each names the case,
    its spacing and what its resampling would need."""
    from pipeline.fingerprint import target_spacing

    cases = [(role, where, f, *_ras_spacing(h, n)) for role, where, f, h in geometry]
    train = [c for c in cases if c[0] == "training"] or cases
    if not train:
        return []
    spacings, shapes = np.array([c[3] for c in train], float), np.array([c[4] for c in train], float)
    median, (target, _) = np.median(spacings, axis=0), target_spacing(spacings, shapes)
    out = []
    for _, where, f, spacing, shape in cases:
        ratio = np.maximum(np.array(spacing) / median, median / np.array(spacing))
        resampled = [max(1, round(k * s / t)) for k, s, t in zip(shape, spacing, target, strict=True)]
        nbytes = 4 * channels * math.prod(resampled)
        size = f"{nbytes / 2**30:.3g} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.3g} MiB"
        need = (f"resampled to the target spacing of a 3D plan, {[round(t, 4) for t in target]} mm, it would be "
                f"{resampled} voxels, {size} as float32")
        if (axes := [a for a, r in enumerate(ratio) if r > SPACING_OUTLIER]):
            a = axes[0]
            out.append(f"{where}: image {f}: spacing {spacing} mm is {ratio[a]:.0f}x off the training median "
                       f"{median[a]:g} mm along axis {a}: {need}")
        elif nbytes > RESAMPLE_WARN_BYTES:
            out.append(f"{where}: image {f}: spacing {spacing} mm, shape {shape}: {need}")
    return out


def _empty_labels(problems: list[str], labelled: int, path: Path) -> list[str]:
    """``problems`` without the all-background labels, which are logged; one problem instead when
    every labelled training case is all background."""
    empty = [p for p in problems if p.endswith(EMPTY_LABEL)]
    if not empty:
        return problems
    rest = [p for p in problems if not p.endswith(EMPTY_LABEL)]
    cases = [p.split(":", 1)[0] for p in empty]
    if labelled and sum(c.startswith("training[") for c in cases) == labelled:
        return rest + [f"{empty[0]}, as every training label ({labelled}) is: nothing to learn"]
    log.warning("%s: %d label(s) all background, kept as cases without the structures: %s%s", path, len(empty),
                ", ".join(cases[:5]), " ..." if len(cases) > 5 else "")
    return rest


def check_entry(entry: dict[str, Any], expect: dict[str, Any]) -> list[str]:
    """Problems of one resolved entry (paths already refused by the manifest are None: skipped)."""
    return _check_entry(entry, expect)[0]


def _check_entry(entry: dict[str, Any], expect: dict[str, Any]) -> tuple[list[str], dict[str, Any] | None]:
    """(problems of one entry, its image's header, or None when the image has a problem)."""
    out: list[str] = []
    image = (_check_channel_files(entry["image"], expect, out) if isinstance(entry.get("image"), list)
             else _check_file(entry["image"], "image", expect, out) if entry.get("image") else None)
    label = _check_file(entry["label"], "label", expect, out) if entry.get("label") else None
    n = expect["spatial"]
    for key in _extra_paths(entry):
        try:
            extra = read_header(entry[key])
        except InputError as e:
            out.append(f"{key} {e}")
            continue
        if image is not None and extra["shape"][:n] != image["shape"][:n]:
            out.append(f"{key} {entry[key]} shape {extra['shape'][:n]} != image shape {image['shape'][:n]}")
    if image is None or label is None:
        return out, image
    image_file = entry["image"][0] if isinstance(entry["image"], list) else entry["image"]
    if image["shape"][:n] != label["shape"][:n]:
        out.append(f"image {image_file} shape {image['shape'][:n]} != label {entry['label']} "
                   f"shape {label['shape'][:n]}")
    elif not np.allclose(image["affine"], label["affine"], rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
        diff = float(np.abs(image["affine"] - label["affine"]).max())
        out.append(f"image {image_file} and label {entry['label']} affines differ "
                   f"(by up to {diff:.4g} mm)")
    return out, image


def _check_channel_files(files: list[str], expect: dict[str, Any], out: list[str]) -> dict[str, Any] | None:
    """The first channel file's header, or None after adding the problems of the list to ``out``:
    one file per declared channel, each one channel, all of one shape and affine."""
    if len(files) != expect["channels"]:
        out.append(f"image {files[0]}: {len(files)} file(s) in the image list, one per channel, but the "
                   f"manifest's modality/channel_names declare {expect['channels']}")
    headers = [_check_file(f, "image", {**expect, "channels": 1}, out) for f in files]
    if None in headers:
        return None
    n = expect["spatial"]
    for f, h in zip(files[1:], headers[1:], strict=True):
        if h["shape"][:n] != headers[0]["shape"][:n]:
            out.append(f"image {f}: shape {h['shape'][:n]} differs from channel 0 {files[0]} "
                       f"shape {headers[0]['shape'][:n]}")
        elif not np.allclose(h["affine"], headers[0]["affine"], rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
            out.append(f"image {f}: affine differs from channel 0 {files[0]} (by up to "
                       f"{float(np.abs(h['affine'] - headers[0]['affine']).max()):.4g} mm)")
    return headers[0] if len(files) == expect["channels"] else None


def _extra_paths(entry: dict[str, Any]) -> list[str]:
    """Keys besides image and label that hold NIfTI paths (resolved by the manifest loader)."""
    return [k for k, v in entry.items() if k not in ("image", "label", "id") and isinstance(v, str) and is_nifti(v)]


def _check_file(path: str, kind: str, expect: dict[str, Any], out: list[str]) -> dict[str, Any] | None:
    """The header of one file, or None after adding its problems to ``out``."""
    try:
        header = read_header(path)
    except InputError as e:
        out.append(f"{kind} {e}")
        return None
    channels = expect["channels"] if kind == "image" else 1
    geometry = [p for p in (_dims_problem(header["shape"], expect["spatial"], channels),
                            _spacing_problem(header["pixdim"])) if p]
    out += [f"{kind} {path}: {p}" for p in geometry]
    try:
        values = _voxels(path, header)
    except Exception as e:  # noqa: BLE001 - corrupt data behind a good header
        out.append(f"{kind} {path}: cannot read voxel data ({first_line(e)})")
        return None
    found = label_value_problems(values, expect["labels"]) if kind == "label" else _finite_problem(values)
    out += [f"{kind} {path}: {p}" for p in found]
    return None if geometry else header


def _spacing_problem(pixdim: tuple[float, ...]) -> str | None:
    """A spacing (mm) outside ``SPACING_MIN_MM``..``SPACING_MAX_MM`` (read_header already refused
    spacings that are not finite and positive)."""
    spacing = [float(f"{s:.6g}") for s in pixdim]
    if all(SPACING_MIN_MM <= s <= SPACING_MAX_MM for s in pixdim):
        return None
    return (f"voxel spacing {spacing} mm is outside the plausible {SPACING_MIN_MM:g} to {SPACING_MAX_MM:g} mm "
            "(a unit or header error?)")


def _dims_problem(shape: tuple[int, ...], spatial: int, channels: int) -> str | None:
    want = spatial + (channels > 1)
    s = list(shape)
    while len(s) > want and s[-1] == 1:
        s.pop()
    if len(s) == want and (channels == 1 or s[-1] == channels):
        return None
    expected = f"{spatial}D" + (f" with {channels} channels on the last axis" if channels > 1 else "")
    return f"{len(shape)}D image {tuple(shape)} where {expected} is expected"


def _voxels(path: str, header: dict[str, Any]) -> np.ndarray:
    """The voxel values, read once."""
    if header["format"] == "dicom":
        import SimpleITK as sitk

        return sitk.GetArrayViewFromImage(read_dicom_series(path))
    import nibabel as nib

    return np.asanyarray(nib.load(path).dataobj)


def _finite_problem(a: np.ndarray) -> list[str]:
    if a.dtype.kind not in "fc":
        return []
    nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    return [f"non-finite voxels: {nan} NaN, {inf} Inf"] if nan or inf else []


def label_value_problems(a: np.ndarray, declared: set[int]) -> list[str]:
    """Problems of a label volume's values: NaN/Inf, non-integer, undeclared, all background."""
    if a.dtype.kind not in "biuf":
        return [f"label data type {a.dtype} is not numeric"]
    out = _finite_problem(a)
    if a.dtype.kind == "f":
        a = a[np.isfinite(a)]
        rounded = np.rint(a)
        fraction = np.abs(a - rounded) > LABEL_ROUNDING  # read_label's rule: within 1e-3 rounds to the integer
        if fraction.any():
            examples = sorted({float(v) for v in a[fraction][:1000]})[:4]
            out.append(f"non-integer label values in {int(fraction.sum())} voxels (e.g. {examples})")
        a = rounded[~fraction]
    values = _unique_ints(a)
    undeclared = sorted(set(values) - declared)
    if undeclared:
        out.append(f"label values {undeclared[:10]} not declared in the manifest's labels {sorted(declared)}")
    if not out and set(values) <= {0}:
        out.append(EMPTY_LABEL)
    return out


def _unique_ints(a: np.ndarray) -> list[int]:
    if a.size == 0:
        return []
    if a.dtype.itemsize <= 2 and a.dtype.kind in "biu":  # bincount: linear time, no sort
        lo = int(a.min())
        counts = np.bincount(a.ravel().astype(np.int32) - lo)
        return [int(v) + lo for v in np.flatnonzero(counts)]
    return [int(v) for v in np.unique(a)]


# ---------------------------------------------------------------- the bundle's contract


def _label_key(name: str) -> str:
    """Label names compare without case and separators ("Anterior" = "anterior", "kidney_right" = "Kidney Right")."""
    return re.sub(r"[^a-z0-9]+", "", str(name).lower())


def manifest_contract(manifest: dict[str, Any]) -> tuple[list[str], int]:
    """(label names in label order, channel count) a loaded manifest declares."""
    labels = [manifest["labels"][k] for k in sorted(manifest["labels"], key=int)]
    return labels, len(manifest.get("channel_names") or manifest.get("modality") or {}) or 1


def bundle_contract(bundle_dir: Path) -> tuple[list[str], int]:
    """(label names, input channel count) of a bundle's ``configs/metadata.json``."""
    meta = bundle_metadata(bundle_dir)
    try:
        fmt = meta["network_data_format"]
        pred, image = fmt["outputs"]["pred"], fmt["inputs"]["image"]
        labels = [str(v) for _, v in sorted(pred["channel_def"].items(), key=lambda kv: int(kv[0]))]
        return labels, int(image["num_channels"])
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{bundle_dir}/configs/metadata.json: no network_data_format contract "
                         f"(outputs.pred.channel_def, inputs.image.num_channels): {first_line(e)}") from None


def check_contract(bundle_dir: Path, manifest: Path) -> None:
    """InputError, one line naming both sides, when the manifest's label names (in order, without
    case or separators) or count, or its channel count, differ from the bundle's metadata."""
    data, _ = parse_manifest(Path(manifest), allow_outside=True)  # labels and modality only
    labels, channels = manifest_contract(data)
    want_labels, want_channels = bundle_contract(Path(bundle_dir))
    where = f"bundle {Path(bundle_dir).name} (configs/metadata.json)"
    if [_label_key(x) for x in labels] != [_label_key(x) for x in want_labels]:
        raise InputError(f"{manifest}: labels {labels} ({len(labels)}) do not match {where} labels "
                         f"{want_labels} ({len(want_labels)}); plan a bundle for this dataset: segpipe plan")
    if channels != want_channels:
        raise InputError(f"{manifest}: {channels} channel(s) (modality/channel_names) do not match {where} "
                         f"{want_channels} input channel(s); plan a bundle for this dataset: segpipe plan")
