"""Dataset fingerprint (nnU-Net style): spacings, shapes, foreground intensities, label counts -> JSON.

``write_fingerprint(manifest)`` reads every training image and label once and writes
``fingerprint.json`` beside the manifest with three parts:

- ``cases``: per study spacing and shape, foreground intensity statistics per channel (mean, std,
  min, max, median, 0.5 and 99.5 percentiles), voxel counts per label and ``label_objects``, the
  connected components per label (face-connected, at least ``MIN_OBJECT_FRACTION`` of the label's
  largest component in that case: a speck of label noise is not an object);
- ``dataset``: median/min/max spacing and shape, anisotropy, pooled foreground intensity statistics
  per channel (from up to 10,000 voxels sampled per case, as nnU-Net does) in ``channels`` (by
  channel index, with its name) and ``intensity`` (by name; a repeated name gets `` (channel c)``),
  class frequencies;
- ``suggested``: values for ids every bundle has (``pixdim``, ``roi_size``), e.g.
  ``segpipe train BUNDLE --set pixdim=[1,1,1] --set roi_size=[40,56,40]``;
- ``normalisation``: the intensity normalisation per channel that ``segpipe plan`` writes for this
  data (:func:`pipeline.plan.normalisation`: the CT window and z-score, or per-image z-score), with
  its ``rationale``. It is not an id to override: a bundle holds it inside its
  ``deterministic_transforms`` (``segpipe plan`` writes a bundle with it).

The data are checked first, as ``segpipe validate`` checks them (:func:`pipeline.validation.require_valid`):
a manifest with a problem (a label value it does not declare, a label off its image, an image with
other channels than declared, an implausible spacing, ...) is refused in one line naming the file,
and no ``fingerprint.json`` is written.

Spacings and shapes are given in the axis order the bundles see, i.e. after reorientation to RAS
(``Orientationd(axcodes="RAS")``), so ``pixdim`` and ``roi_size`` apply as they are; a 2D image
stored as (X, Y, 1) keeps its third axis, as the loader does (:func:`loaded_axes`). The foreground
is ``label > 0``; unlike nnU-Net the volumes are not cropped to their non-zero region first.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError, first_line
from pipeline.evaluation import json_safe
from pipeline.fileio import atomic_path, read_label
from pipeline.manifest import image_files

log = logging.getLogger(__name__)

SAMPLES_PER_CASE = 10_000  # foreground voxels per case pooled for the dataset intensity statistics
ANISOTROPY_THRESHOLD = 3.0  # nnU-Net's: low-res axis spacing > 3x the others (and 3x fewer voxels)
MIN_OBJECT_FRACTION = 0.05  # a component counts as an object from 5% of its label's largest one


def intensity_stats(values: np.ndarray) -> dict[str, float]:
    """mean, std, min, max, median and the 0.5/99.5 percentiles of a 1D array (NaN when empty)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return dict.fromkeys(("mean", "std", "min", "max", "median", "percentile_00_5", "percentile_99_5"),
                             math.nan)
    p005, p50, p995 = np.percentile(v, [0.5, 50.0, 99.5])
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
            "median": float(p50), "percentile_00_5": float(p005), "percentile_99_5": float(p995)}


def ras_order(affine: np.ndarray, ndim: int) -> list[int]:
    """For each axis of the reoriented (RAS) array, the file axis it comes from."""
    import nibabel as nib

    ornt = nib.io_orientation(affine)[:ndim, 0]
    if np.isnan(ornt).any() or sorted(ornt.astype(int)) != list(range(ndim)):
        return list(range(ndim))  # degenerate or 2D-in-3D affine: keep the file's order
    order = [0] * ndim
    for file_axis, ras_axis in enumerate(ornt.astype(int)):
        order[ras_axis] = file_axis
    return order


def _read_image(image: Path | list[Path]) -> tuple[np.ndarray, Any]:
    """The voxels of one image file, or of one file per channel stacked on a last axis, and the
    (first) file's nibabel image for its geometry."""
    import nibabel as nib

    arrays, first = [], None
    for f in image_files(image):
        try:
            img = nib.load(str(f))
            arrays.append(img.get_fdata(dtype=np.float32))
        except Exception as e:  # noqa: BLE001 - any reader failure is this file's problem
            raise InputError(f"{f}: cannot read as NIfTI ({type(e).__name__}: {first_line(e)})") from None
        first = first or img
    if len(arrays) == 1:
        return arrays[0], first
    if len({a.shape for a in arrays}) != 1:
        raise InputError(f"{image_files(image)[1]}: channel files of one image differ in shape "
                         f"{[a.shape for a in arrays]}")
    return np.stack(arrays, axis=-1), first


def loaded_axes(label: np.ndarray, image: Any, image_file: Path, label_file: Path) -> np.ndarray:
    """``label`` (from :func:`pipeline.fileio.read_label`, trailing singletons dropped) with the
    spatial axes the bundles' loader gives ``image``: MONAI's ``NibabelReader`` takes a file's first
    three axes as spatial and a fourth as channels. So a 2D image stored as a single-slice volume,
    (X, Y, 1) or (X, Y, 1, C), stays one voxel thick here as in training, and is planned as 2D
    slices across that axis (``slice_axis``) as (1, X, Y) is. InputError (one line) for the two
    layouts the loader cannot train: a 2D image with channels on its third axis, (X, Y, C), read as
    C slices, and a label with other spatial axes than its image ((X, Y) beside (X, Y, 1))."""
    import nibabel as nib

    spatial = tuple(int(n) for n in image.shape[:3])
    extra = spatial[label.ndim:] if spatial[:label.ndim] == label.shape else ()  # the axes read_label dropped
    if any(n > 1 for n in extra):
        raise InputError(f"{image_file}: shape {tuple(image.shape)} is read as a 3D volume of {spatial[-1]} slices "
                         f"(a NIfTI's third axis is spatial), but its label {label_file} is 2D {label.shape}: store "
                         f"a 2D image's channels on a fourth axis, {(*spatial[:2], 1, spatial[-1])}, or one file "
                         "per channel")
    if (label_rank := min(len(nib.load(str(label_file)).shape), 3)) != len(spatial):  # the header only
        raise InputError(f"{label_file}: read with {label_rank} spatial axes, its image {image_file} "
                         f"{tuple(image.shape)} with {len(spatial)}: store both alike (a single-slice image "
                         "(X, Y, 1) with a label (X, Y, 1))")
    return label.reshape(spatial) if extra else label


def label_objects(label: np.ndarray) -> dict[str, int]:
    """Objects per foreground label: face-connected components of at least ``MIN_OBJECT_FRACTION``
    of that label's largest component (searched within the label's bounding box)."""
    from scipy import ndimage

    out = {}
    for value, box in enumerate(ndimage.find_objects(label.astype(np.int64, copy=False)), start=1):
        if box is None:
            continue
        components, n = ndimage.label(label[box] == value)
        sizes = np.bincount(components.ravel())[1:]
        out[str(value)] = int((sizes >= MIN_OBJECT_FRACTION * sizes.max()).sum()) if n else 0
    return out


def case_fingerprint(image_path: Path | list[Path], label_path: Path, rng: np.random.Generator
                     ) -> tuple[dict, list[np.ndarray]]:
    """Statistics of one study and its sampled foreground intensities per channel (read once each).
    ``image_path`` is one file or a list of files, one per channel."""
    image, img = _read_image(image_path)
    label = loaded_axes(read_label(label_path)[0], img, image_files(image_path)[0], label_path)
    ndim = label.ndim
    if image.shape[:ndim] != label.shape:
        raise InputError(f"{label_path}: shape {label.shape} differs from image {image_files(image_path)[0]} "
                         f"shape {image.shape[:ndim]}")
    channels = image.reshape(*label.shape, -1)  # spatial dims + one axis of channels (modalities)
    order = ras_order(img.affine, ndim)
    zooms = img.header.get_zooms()
    fg = label > 0
    n_fg = int(fg.sum())
    stats, samples = [], []
    for c in range(channels.shape[-1]):
        values = channels[..., c][fg]
        stats.append(intensity_stats(values))
        take = min(SAMPLES_PER_CASE, values.size)
        samples.append(rng.choice(values, take, replace=False) if take < values.size else values)
    ids, counts = np.unique(label, return_counts=True)
    record = {
        "image": [str(f) for f in image_path] if isinstance(image_path, list) else str(image_path),
        "label": str(label_path),
        "spacing": [round(float(zooms[a]), 6) for a in order], "shape": [int(label.shape[a]) for a in order],
        "foreground_fraction": n_fg / label.size,
        "intensity": stats,
        "label_voxels": {str(int(i)): int(n) for i, n in zip(ids, counts, strict=True)},
        "label_objects": label_objects(label),
    }
    return record, samples


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[list[float], bool]:
    """nnU-Net's full-resolution target spacing: the median spacing, except for anisotropic data
    (low-res axis > 3x the others in spacing and < 1/3 in voxels) where that axis takes the 10th
    percentile of its spacings (at least the largest other spacing). Returns (spacing, anisotropic)."""
    target = np.median(spacings, axis=0)
    size = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    if not others:
        return target.tolist(), False
    other_spacing = max(target[i] for i in others)
    aniso = bool(target[worst] > ANISOTROPY_THRESHOLD * other_spacing
                 and size[worst] * ANISOTROPY_THRESHOLD < min(size[i] for i in others))
    if aniso:
        low = float(np.percentile(spacings[:, worst], 10))
        if low < other_spacing:
            low = max(other_spacing, low) + 1e-5
        target[worst] = low
    return [float(t) for t in target], aniso


def suggest_roi(median_shape: list[float], cap: int = 128, divisor: int | None = None) -> tuple[list[int], int]:
    """Patch covering ``median_shape`` (voxels at the target spacing), each axis rounded up to a multiple
    of ``divisor`` (auto: 8 when every axis is under 64 voxels, else 16) and capped at ``cap``."""
    if divisor is None:
        divisor = 8 if max(median_shape) < 64 else 16
    cap = max(divisor, cap // divisor * divisor)
    # 1e-6: a float32 spacing (0.8 mm is 0.800000011) makes 48 voxels 48.0000007, which ceil took a whole step up
    roi = [int(min(cap, max(divisor, math.ceil(s / divisor - 1e-6) * divisor))) for s in median_shape]
    return roi, divisor


def _is_ct(modality: str) -> bool:
    return modality.strip().upper() in {"CT", "CT3D", "COMPUTED TOMOGRAPHY"}


def dataset_fingerprint(cases: list[dict], samples: list[list[np.ndarray]], manifest: dict[str, Any],
                        cap: int = 128) -> dict[str, Any]:
    """The dataset-level part and the suggested bundle overrides, from the per-case records."""
    spacings = np.array([c["spacing"] for c in cases], dtype=float)
    shapes = np.array([c["shape"] for c in cases], dtype=float)
    target, aniso = target_spacing(spacings, shapes)
    resampled = np.median(shapes * spacings / np.array(target), axis=0)
    roi, divisor = suggest_roi(resampled.tolist(), cap=cap)

    names = manifest.get("channel_names") or manifest.get("modality") or {"0": "unknown"}
    modality = {str(k): str(v) for k, v in names.items()}
    n_channels = len(samples[0])
    channels, intensity = [], {}
    for c in range(n_channels):
        name = modality.get(str(c), f"channel_{c}")
        stats = intensity_stats(np.concatenate([s[c] for s in samples]))
        channels.append({"index": c, "name": name, **stats})
        intensity[name if name not in intensity else f"{name} (channel {c})"] = stats

    labels = {str(k): str(v) for k, v in (manifest.get("labels") or {}).items()}
    total = sum(sum(c["label_voxels"].values()) for c in cases)
    fg_total = sum(n for c in cases for k, n in c["label_voxels"].items() if k != "0")
    found = sorted({k for c in cases for k in c["label_voxels"]} | set(labels), key=int)
    classes = {}
    for k in found:
        n = sum(c["label_voxels"].get(k, 0) for c in cases)
        classes[labels.get(k, f"label_{k}")] = {
            "label": int(k), "voxels": n, "voxel_fraction": n / total,
            "fraction_of_foreground": (n / fg_total if fg_total else math.nan) if k != "0" else None,
            "cases_present": sum(c["label_voxels"].get(k, 0) > 0 for c in cases),
        }
    unknown = [k for k in found if k not in labels]
    median_spacing = np.median(spacings, 0)

    suggested: dict[str, Any] = {"pixdim": [round(t, 5) for t in target], "roi_size": roi}
    return {
        "dataset": {
            "n_cases": len(cases), "modality": modality, "labels": labels, "labels_not_in_manifest": unknown,
            "spacing": {"median": median_spacing.tolist(), "min": spacings.min(0).tolist(),
                        "max": spacings.max(0).tolist()},
            "shape": {"median": np.median(shapes, 0).tolist(), "min": shapes.min(0).astype(int).tolist(),
                      "max": shapes.max(0).astype(int).tolist()},
            "median_shape_at_target_spacing": [round(float(s), 2) for s in resampled],
            "anisotropy": {"ratio": float(median_spacing.max() / median_spacing.min()), "anisotropic": aniso,
                           "low_res_axis": int(np.argmax(median_spacing)), "threshold": ANISOTROPY_THRESHOLD},
            "channels": channels,
            "intensity": intensity,
            "classes": classes,
        },
        "suggested": suggested,
        "suggested_rationale": {
            "pixdim": "nnU-Net full-resolution target: median spacing"
                      + ("; low-res axis at its 10th percentile (anisotropic)" if aniso else ""),
            "roi_size": f"median shape at pixdim rounded up to a multiple of {divisor}, capped at {cap}",
        },
        "normalisation": planned_normalisation(modality, channels),
    }


def planned_normalisation(modality: dict[str, str], channels: list[dict[str, Any]]) -> dict[str, Any]:
    """The normalisation ``segpipe plan`` writes for these channels (rule 6 of :mod:`pipeline.plan`,
    called, not restated): ``{"channels": [per-channel scheme], "rationale": sentence}``, or
    ``{"channels": [], "rationale": why not}`` where the plan would refuse the statistics."""
    from pipeline.plan import normalisation

    named = [{"index": c["index"], "name": c["name"], "modality": "CT" if _is_ct(c["name"]) else "other"}
             for c in channels]
    try:
        norm, why = normalisation(named, channels)
    except InputError as e:
        return {"channels": [], "rationale": f"segpipe plan would refuse: {e}"}
    return {"channels": norm["channels"], "rationale": why}


def write_fingerprint(manifest: Path, out: Path | None = None, cap: int = 128, seed: int = 0,
                      validate: bool = True, say: bool = True) -> Path:
    """Fingerprint the ``training`` entries of ``manifest``; write JSON (default: ``fingerprint.json``
    beside the manifest) and return its path. The manifest is validated first
    (:func:`pipeline.validation.require_valid`: InputError naming the first problem, nothing written);
    ``validate=False`` is for a caller that has just validated it; ``say=False`` logs the summary
    line at debug level (``segpipe plan`` writes into a temporary folder and says what it planned)."""
    from tqdm.auto import tqdm

    from pipeline.manifest import load_manifest

    manifest = Path(manifest)
    if validate:
        from pipeline.validation import require_valid

        require_valid(manifest)
    m = load_manifest(manifest)
    entries = [e for e in m.get("training", []) if e.get("image") and e.get("label")]
    if not entries:
        raise InputError(f"{manifest}: no training entries with both image and label to fingerprint")
    rng = np.random.default_rng(seed)
    cases, samples = [], []
    for e in tqdm(entries, desc="fingerprint", unit="case", disable=len(entries) < 20 or not sys.stderr.isatty()):
        image = [Path(f) for f in e["image"]] if isinstance(e["image"], list) else Path(e["image"])
        record, s = case_fingerprint(image, Path(e["label"]), rng)
        cases.append(record)
        samples.append(s)
    if (odd := [i for i, s in enumerate(samples) if len(s) != len(samples[0])]):
        i = odd[0]
        raise InputError(f"{cases[i]['image']}: {len(samples[i])} channel(s), but {cases[0]['image']} has "
                         f"{len(samples[0])}: images have different numbers of channels")
    fp = {"manifest": str(manifest.resolve()), **dataset_fingerprint(cases, samples, m, cap=cap), "cases": cases}
    out = Path(out) if out else manifest.parent / "fingerprint.json"
    out = out / "fingerprint.json" if out.is_dir() else out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(json_safe(fp), indent=2))
    except OSError as e:
        raise InputError(f"{out}: cannot write the fingerprint ({e.strerror or e})") from None
    log.log(logging.INFO if say else logging.DEBUG, "fingerprinted %d cases of %s: median spacing %s, suggested %s; "
            "wrote %s", len(cases), manifest, fp["dataset"]["spacing"]["median"], fp["suggested"], out)
    return out
