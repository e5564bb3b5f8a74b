"""Planning rules (issue #17): a dataset fingerprint -> ``plan.json``, the decisions a bundle needs, as data.

``make_plan(fingerprint, manifest, device, budget_min)`` is a pure function of ``fingerprint.json``
(:mod:`pipeline.fingerprint`), the manifest's labels and modalities, the device ("cpu"/"cuda") and a
wall-time budget; each decision has a ``rationale`` sentence naming the fingerprint figure it came
from. The rules, nnU-Net v2's planner (Isensee et al. 2021) unless said otherwise:

1. Spacing: the median; for anisotropic data (coarsest axis > 3x the others in spacing, < 1/3 in
   voxels) that axis at the 10th percentile of its spacings (:func:`pipeline.fingerprint.target_spacing`).
   Spacings > 10x apart between cases: planned for the median, with a warning.
2-4. Patch, topology, width and batch: :mod:`pipeline.plan_network` (nnU-Net's rules within a
   device budget; 16 filters on the CPU).
5. 2D for 2D data, single-slice volumes ((1, X, Y), and 2D images stored as (X, Y, 1) or
   (X, Y, 1, C): MONAI loads a NIfTI's first three axes as spatial, so they are volumes one voxel
   thick, :func:`pipeline.fingerprint.loaded_axes`), and anisotropic data whose coarse axis has < 8
   voxels at target spacing (a 3D net could not pool it once: a 2D net with a few slices of context
   at 3D cost). Slices then run across the coarse axis, which keeps its spacing (``pixdim`` 0 there):
   training crops are one voxel thick along it and squeezed to 2D (``SqueezeDimd``); validation and
   prediction run the overlap-tile predictor slice by slice (``pipeline.slice_inference``), so flip
   TTA and the mirror margin work in the slice plane as in 2D bundles (MONAI's ``SliceInferer`` is a
   plain sliding window: neither).
6. Normalisation per channel (statistics by channel index, so two CT channels may share a name):
   CT clipped to the foreground 0.5/99.5 percentiles and z-scored with the foreground mean/sd (one
   ``ScaleIntensityRanged`` does both exactly); other modalities per-image z-score
   (``NormalizeIntensityd`` channel-wise). Mixed channels: ``SplitDimd`` into one key per channel,
   one transform each, ``ConcatItemsd`` back (``Invertd`` still inverts predictions: the split
   keys carry the image's applied operations).
7. Loss: boundary-weighted Dice+CE, w0 10, sigma = 0.1 x the smallest class's median equivalent
   diameter per object (``label_objects``: connected components counted by the fingerprint; the
   U-Net paper: sigma ~5 px for cells ~10x that), clamped to 1-5 voxels (5 px: the
   paper's); the border term on background only for one foreground class (the paper's cells),
   everywhere when several classes can touch.
8. (:mod:`pipeline.plan_augmentation`) A third of the patches centred on foreground (nnU-Net's 33%); flips along every axis but those a
   label name gives a side (left/right: RAS axis 0, anterior/posterior: 1, superior/inferior: 2),
   except that along the patient's left-right axis a flip that swaps left/right label pairs
   (``pipeline.laterality``: pairs by name, ``left_parotid``/``right_parotid``, ``LK``/``RK``, or
   declared in the manifest's ``lateral_pairs``) is planned when every label with a left/right side has its
   partner (``RandLateralFlipd``; nnU-Net mirrors such labels wrongly, TotalSegmentator gives the
   flip up); a sided label without a partner still forbids that axis; heart chambers are not
   mirror images and flip without a swap, as in nnU-Net (``laterality.heart_chamber``);
   rotation +-30 deg and scaling 0.7-1.4 on 20% of patches, in-plane only (+-180 deg about the
   coarse axis) for anisotropic 3D data.
9. (:mod:`pipeline.plan_schedule`, with rule 10) Schedule: AdamW 2e-3, cosine over the wall-time budget (``time_budget_min``), ``max_epochs`` a
   cap, validation interval for about 6 validations in the budget, fewer where validating the fold-0
   cases whole would take more than 15% of it (estimated from the median image). An epoch is one pass over the
   training cases but at least 50 iterations (``epoch_length``: tiny datasets would otherwise
   checkpoint and log every few steps); full batches only (``drop_last``: one shape for a compiled
   step); ``torch.compile`` only for budgets of 5 min or more (compiling takes about a minute).
10. Inference: window = patch (a 128^3 window on the head-and-neck CT model lost 0.17 Dice: instance
    normalisation sees other statistics), overlap 0.5, Gaussian blending (``tiling``; the
    overlap-tile ids are declared for ``--set``); flip TTA on the training flip axes where the median
    image is one window, else on one axis, the patient's left-right where the data has it (every
    TTA axis doubles the passes over every window: head-and-neck CT, 100 windows, flips on all three
    axes 0.7276 Dice at 52 s per case, on the left-right one 0.7305 at 13 s); the left-right flip
    swaps the pairs' probabilities back (``lateral_pairs``); mirror margin 0 when
    the patch covers the median image (hippocampus: "auto" cost 0.0014 Dice), else "auto". Cases
    smaller than the patch are mirror-padded in training and inference (one warning line).
No post-processing is planned (``postprocess`` empty): nnU-Net chooses it on cross-validation
predictions, which a plan made before training does not have.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError, UsageError
from pipeline.evaluation import json_safe
from pipeline.fingerprint import ANISOTROPY_THRESHOLD, _is_ct
from pipeline.fingerprint import target_spacing as nnunet_target_spacing
from pipeline.laterality import label_pairs
from pipeline.plan_augmentation import (  # noqa: F401 - rule 8, part of this module's interface
    NNUNET_INTENSITY,
    SIDES,
    augmentation,
    lateral_flip,
    sided_axes,
)
from pipeline.plan_network import (  # noqa: F401 - rules 2-4, part of this module's interface
    BASE_FEATURES,
    INITIAL_PATCH,
    ITERATION_VOXELS,
    MAX_FEATURES,
    MIN_BATCH,
    MIN_FEATURE_MAP,
    patch_and_topology,
    pool_and_conv,
)
from pipeline.plan_network import rounded as _r
from pipeline.plan_schedule import (  # noqa: F401 - rules 9-10, part of this module's interface
    COMPILE_MIN_BUDGET,
    DEVICES,
    MIN_EPOCH_ITERATIONS,
    NUM_FOLDS,
    OVERLAP,
    SAMPLE_OVERHEAD_S,
    THROUGHPUT,
    VALIDATION_SHARE,
    VALIDATIONS,
    inference,
    schedule,
)

log = logging.getLogger(__name__)

SIGMA_FRACTION, SIGMA_MAX_VOXELS, W0 = 0.1, 5.0, 10.0


def _get(d: dict, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(d, dict) or key not in d:
            raise InputError(f"fingerprint: missing field {path!r} (rerun `segpipe fingerprint`)")
        d = d[key]
    return d


def check_arguments(device: str, budget_min: float) -> None:
    """UsageError for a device the planner does not know or a budget that is not a finite positive
    number of minutes (``plan_bundle`` calls it first, before reading any image)."""
    if device not in DEVICES:
        raise UsageError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    if not (isinstance(budget_min, (int, float)) and 0 < budget_min < math.inf):
        raise UsageError(f"--budget-min {budget_min!r}: must be a positive number of minutes")


def label_names(raw: Any) -> list[str]:
    """The names of a manifest's ``labels`` in value order; InputError (naming the field) for keys
    that are not label values or values not consecutive from 0 with a foreground class."""
    try:
        keys = sorted(int(k) for k in raw)
    except (TypeError, ValueError):
        raise InputError(f"labels: keys must be label values ('0', '1', ...), got {list(raw or [])}") from None
    if keys != list(range(len(keys))) or len(keys) < 2:
        raise InputError(f"labels: values {keys} must be consecutive from 0, with a foreground class")
    return [str(raw.get(str(k), raw.get(k))) for k in keys]


def check_inputs(fingerprint: dict, manifest: dict) -> tuple[list[str], list[dict], list[str]]:
    """(label names, channels [{index, name, modality}], warnings). InputError naming the field for
    labels not consecutive from 0 or found but not named, differing channel counts, 2D mixed with
    3D, fewer cases than folds; warnings for a class absent from every label and spacings > 10x apart."""
    names = label_names(manifest.get("labels") or _get(fingerprint, "dataset.labels"))
    if unknown := fingerprint.get("dataset", {}).get("labels_not_in_manifest"):
        raise InputError(f"labels: values {unknown} occur in the label images but the manifest names none")
    if not (cases := _get(fingerprint, "cases")):
        raise InputError("fingerprint: field 'cases' is empty")
    if len(cases) < NUM_FOLDS:
        raise InputError(f"training: {len(cases)} cases, fewer than the {NUM_FOLDS} cross-validation folds "
                         f"(at least {NUM_FOLDS} labelled cases are needed)")
    for i, c in enumerate(cases):
        if missing := [f for f in ("spacing", "shape", "intensity", "label_voxels") if f not in c]:
            raise InputError(f"fingerprint: cases[{i}] lacks {missing} (rerun `segpipe fingerprint`)")
    for field, what in (("spacing", "spatial dimensions (a mix of 2D and 3D)"), ("intensity", "channels")):
        n0 = len(cases[0][field])
        if bad := [i for i, c in enumerate(cases) if len(c[field]) != n0]:
            i = bad[0]
            raise InputError(f"cases[{i}].{field}: {len(cases[i][field])} {what}, cases[0] has {n0}")
    raw = manifest.get("channel_names") or manifest.get("modality") or _get(fingerprint, "dataset.modality")
    modality, n = {str(k): str(v) for k, v in raw.items()}, len(cases[0]["intensity"])
    if set(modality) != {str(i) for i in range(n)}:  # as sets: "10" sorts before "2" as text
        named = sorted(modality, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
        raise InputError(f"modality: the manifest names channels {named}, the images have {n}")
    channels = [{"index": i, "name": m, "modality": "CT" if _is_ct(m) else "other"}
                for i, m in ((i, modality[str(i)]) for i in range(n))]
    warnings = [f"class {name!r} (label {c['label']}) is absent from every label image"
                for name, c in _get(fingerprint, "dataset.classes").items()
                if c.get("label") and not c.get("cases_present")]
    spacings = np.array([c["spacing"] for c in cases], float)
    warnings += [f"spacing along axis {a} differs {r:.0f}-fold between cases ({spacings[:, a].min():g}-"
                 f"{spacings[:, a].max():g} mm): planned for the median"
                 for a, r in enumerate(spacings.max(0) / spacings.min(0)) if r > 10]
    for w in warnings:
        log.warning("%s", w)
    return names, channels, warnings


def target_spacing(fingerprint: dict) -> tuple[list[float], bool, list[float], str]:
    """Rule 1: (target spacing, anisotropic, median shape at target spacing, rationale)."""
    cases = _get(fingerprint, "cases")
    spacings = np.array([c["spacing"] for c in cases], float)
    shapes = np.array([c["shape"] for c in cases], float)
    target, aniso = nnunet_target_spacing(spacings, shapes)
    median_shape = np.round(np.median(shapes * spacings / np.array(target), axis=0), 3)  # 48 * 0.8 / 0.8 > 48
    why = f"median spacing {_r(np.median(spacings, 0), 3)} mm over {len(cases)} cases"
    if aniso:
        k = int(np.argmax(np.median(spacings, 0)))
        why += (f"; anisotropic (axis {k} > {ANISOTROPY_THRESHOLD:g}x coarser, < 1/3 of the voxels): "
                f"axis {k} at the 10th percentile of its spacings, {target[k]:.3g} mm")
    return [float(t) for t in target], aniso, [float(x) for x in median_shape], why


def dimensionality(target: list[float], median_shape: list[float], tensor_image_size: str | None = None
                   ) -> tuple[int, int | None, str]:
    """Rule 5: (spatial_dims, slice_axis or None, rationale)."""
    if len(target) == 2:
        return 2, None, "2D images"
    k = int(np.argmin(median_shape)) if min(median_shape) <= 1 else int(np.argmax(target))
    ratio, slices = target[k] / min(target), median_shape[k]
    if slices <= 1:
        return 2, k, f"2D: a single slice along axis {k} (median {slices:.3g} voxels)"
    if ratio > ANISOTROPY_THRESHOLD and slices < 2 * MIN_FEATURE_MAP:
        return 2, k, (f"2D slices across axis {k}: {target[k]:.3g} mm is {ratio:.1f}x the finest spacing and "
                      f"the median image has {slices:.1f} < {2 * MIN_FEATURE_MAP} voxels along it, too few "
                      "to pool once")
    if str(tensor_image_size).upper() == "2D":
        raise InputError(f"tensorImageSize: '2D', but the cases are 3D (median shape {_r(median_shape, 1)})")
    return 3, None, f"3D: the median image at target spacing has {slices:.1f} voxels along coarsest axis {k}"


#: nnU-Net v2's channel names that name a normalisation: scheme, rationale
NNUNET_SCHEMES = {"nonorm": ("none", "no normalisation"),
                  "rescale_to_0_1": ("rescale_0_1", "per-image min-max to [0, 1]"),
                  "rgb_to_0_1": ("rgb_0_1", "8-bit values divided by 255")}


def normalisation(channels: list[dict], stats: list[dict]) -> tuple[dict, str]:
    """Rule 6: the scheme and parameters per channel (statistics by channel index: two CT channels
    may share a name), and MONAI transforms applying them to "image"."""
    schemes, whys = [], []
    for ch in channels:
        named = NNUNET_SCHEMES.get(str(ch["name"]).lower())  # nnU-Net v2's channel names that choose a scheme
        if named is not None and ch["modality"] != "CT":
            schemes.append({**ch, "scheme": named[0]})
            whys.append(f"channel {ch['index']} {ch['name']!r}: {named[1]} (nnU-Net's channel name)")
            continue
        if ch["modality"] != "CT":
            schemes.append({**ch, "scheme": "zscore_per_image", "nonzero": False})
            whys.append(f"channel {ch['index']} {ch['name']!r}: per-image z-score (not CT)")
            continue
        st = stats[ch["index"]] if ch["index"] < len(stats) else {}
        keys = ("percentile_00_5", "percentile_99_5", "mean", "std")
        lo, hi, mean, sd = (st.get(k, math.nan) for k in keys)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (lo, hi, mean, sd)):
            raise InputError(f"dataset.channels[{ch['index']}]: no foreground statistics for CT channel "
                             f"{ch['name']!r} (rerun `segpipe fingerprint`)")
        if not (hi > lo and sd > 0 and _r(sd) > 0):
            raise InputError(f"dataset.channels[{ch['index']}]: CT channel {ch['name']!r} has one intensity over "
                             f"the labelled voxels ({lo:.4g}..{hi:.4g}, sd {sd:.3g}): nothing to normalise; is it a "
                             "CT, and are its labels on the image?")
        schemes.append({**ch, "scheme": "ct", "clip": _r([lo, hi]), "mean": _r(mean), "std": _r(sd)})
        whys.append(f"channel {ch['index']} {ch['name']!r} (CT): clip to the foreground 0.5/99.5 percentiles "
                    f"[{lo:.4g}, {hi:.4g}], z-score with the foreground mean {mean:.4g} and sd {sd:.4g}")

    def op(s: dict, key: str) -> dict:
        if s["scheme"] == "none":
            return {"_target_": "Identityd", "keys": key}
        if s["scheme"] == "rescale_0_1":
            return {"_target_": "ScaleIntensityd", "keys": key, "minv": 0.0, "maxv": 1.0, "channel_wise": True}
        if s["scheme"] == "rgb_0_1":
            return {"_target_": "ScaleIntensityRanged", "keys": key, "a_min": 0.0, "a_max": 255.0, "b_min": 0.0,
                    "b_max": 1.0, "clip": True}
        if s["scheme"] != "ct":
            return {"_target_": "NormalizeIntensityd", "keys": key, "nonzero": False, "channel_wise": True}
        (lo, hi), m, sd = s["clip"], s["mean"], s["std"]  # (x - m) / sd on [lo, hi], clipped: exact
        return {"_target_": "ScaleIntensityRanged", "keys": key, "a_min": lo, "a_max": hi,
                "b_min": _r((lo - m) / sd, 6), "b_max": _r((hi - m) / sd, 6), "clip": True}

    if len(schemes) == 1 or len({s["scheme"] for s in schemes}) == 1 and schemes[0]["scheme"] != "ct":
        transforms = [op(schemes[0], "image")]
    else:  # one scheme per channel: split the channels into keys, normalise each, concatenate them again
        keys = [f"image_{i}" for i in range(len(schemes))]
        split = {"_target_": "SplitDimd", "keys": "image", "dim": 0, "keepdim": True, "update_meta": False,
                 "output_postfixes": [str(i) for i in range(len(schemes))]}
        transforms = [split,
                      *[op(s, k) for s, k in zip(schemes, keys, strict=True)],
                      {"_target_": "ConcatItemsd", "keys": keys, "name": "image", "dim": 0},
                      {"_target_": "DeleteItemsd", "keys": keys}]
    return {"channels": schemes, "transforms": transforms}, "; ".join(whys)


def object_diameters(cases: list[dict], labels: list[str]) -> dict[str, float]:
    """Median equivalent diameter (mm) per foreground class: the sphere (circle for 2D data) of its
    voxels x voxel volume per case. One object per class and case is assumed unless a case carries
    ``label_objects`` {label: count} (``pipeline.fingerprint.label_objects``)."""
    out = {}
    for k, name in enumerate(labels[1:], start=1):
        d = []
        for c in cases:
            n = c["label_voxels"].get(str(k), 0) / max(1, (c.get("label_objects") or {}).get(str(k), 1))
            vol = n * float(np.prod(c["spacing"]))
            if n > 0:
                d.append((6 * vol / math.pi) ** (1 / 3) if len(c["spacing"]) == 3
                         else math.sqrt(4 * vol / math.pi))
        if d:
            out[name] = float(np.median(d))
    return out


def loss_sigma(diameters: dict[str, float], spacing: list[float]) -> tuple[float, str]:
    """Rule 7: sigma (mm) = SIGMA_FRACTION x the smallest class's median equivalent diameter,
    clamped to [1, SIGMA_MAX_VOXELS] voxels of the finest spacing the network sees."""
    lo, hi = min(spacing), SIGMA_MAX_VOXELS * min(spacing)
    if not diameters:
        return hi, f"no object sizes in the fingerprint: sigma {hi:.3g} mm ({SIGMA_MAX_VOXELS:g} voxels)"
    name, d = min(diameters.items(), key=lambda kv: kv[1])
    sigma = round(min(hi, max(lo, SIGMA_FRACTION * d)), 3)
    return sigma, (f"smallest class {name!r}: median equivalent diameter {d:.3g} mm; sigma "
                   f"{SIGMA_FRACTION:g} x {d:.3g} mm within [{lo:.3g}, {hi:.3g}] mm "
                   f"(1-{SIGMA_MAX_VOXELS:g} voxels) = {sigma:.3g} mm; w0 {W0:g}")


def smaller_than_patch(cases: list[dict], target: list[float], axes: list[int], roi: list[int]) -> list[str]:
    """One warning line (or none) for the cases smaller than the patch along a network axis at the
    target spacing: they are mirror-padded to the patch in training and in inference."""
    small = []
    for c in cases:
        shape = [c["shape"][a] * c["spacing"][a] / target[a] for a in axes]
        if any(n < r for n, r in zip(shape, roi, strict=True)):
            small.append((c, shape))
    if not small:
        return []
    c, shape = small[0]
    image = c["image"][0] if isinstance(c["image"], list) else c["image"]
    line = (f"{len(small)} of {len(cases)} cases are smaller than the patch {roi} at target spacing (e.g. "
            f"{image}: {_r(shape, 1)} voxels): padded by mirroring in training and in inference")
    log.warning("%s", line)
    return [line]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def make_plan(fingerprint: dict, manifest: dict, device: str = "cpu", budget_min: float = 30.0,
              name: str | None = None, compiler: bool = True) -> dict[str, Any]:
    """The plan: every decision a bundle needs, each with a rationale (rules: the module docstring).
    ``compiler``: whether a C++ compiler is at hand for torch.compile on a CPU."""
    check_arguments(device, budget_min)
    labels, channels, warnings = check_inputs(fingerprint, manifest)
    cases, classes = fingerprint["cases"], _get(fingerprint, "dataset.classes")
    target, aniso, median_shape, why_spacing = target_spacing(fingerprint)
    dims, slice_axis, why_dims = dimensionality(target, median_shape, manifest.get("tensorImageSize"))
    keep = [a for a in range(len(target)) if a != slice_axis]
    net_spacing, net_shape = [target[a] for a in keep], [median_shape[a] for a in keep]
    topo, why_patch = patch_and_topology(net_spacing, net_shape, device, len(cases))
    net = {**topo.pop("network"), "in_channels": len(channels), "out_channels": len(labels)}
    batch, roi = topo.pop("batch_size"), topo["roi_size"]
    norm, why_norm = normalisation(channels, _get(fingerprint, "dataset.channels"))
    sigma, why_sigma = loss_sigma(object_diameters(cases, labels), net_spacing)
    flat = dims == 3 and max(target) / min(target) > ANISOTROPY_THRESHOLD
    aniso_axis = int(np.argmax(target)) if flat else None
    source = str(manifest.get("manifest_path") or fingerprint.get("manifest") or "manifest")
    pairs, pairs_how = label_pairs(labels, manifest, source)
    aug, why_aug = augmentation(labels, dims, slice_axis, aniso_axis, roi, device, pairs, pairs_how)
    sched, why_sched = schedule(device, budget_min, len(cases), topo["patch_voxels"], batch, dims, compiler,
                                float(np.prod(median_shape)))
    infer, why_infer = inference(roi, net_shape, aug["flip_axes"], slice_axis, aug["lateral_axis"],
                                 aug["lateral_pairs"])
    crop = roi[:slice_axis] + [1] + roi[slice_axis:] if slice_axis is not None else list(roi)
    warnings += smaller_than_patch(cases, target, keep, roi)
    n_fg = len(labels) - 1
    rare = min(((c.get("voxel_fraction") or 0.0, n) for n, c in classes.items() if c.get("label")),
               default=(0.0, "-"))
    plan = {
        "plan_version": 1,
        "name": name or f"{_slug(str(manifest.get('name', 'dataset')))}_{_slug(channels[0]['name'])}_{dims}d",
        "manifest": fingerprint.get("manifest"), "n_cases": len(cases), "device": device,
        "budget_min": float(budget_min), "spatial_dims": dims, "slice_axis": slice_axis,
        "labels": labels, "out_channels": len(labels), "channels": channels, "in_channels": len(channels),
        "spacing": {"target": _r(target, 5),
                    "pixdim": [0.0 if a == slice_axis else _r(t, 5) for a, t in enumerate(target)],
                    "anisotropic": aniso, "median_shape_at_target": _r(median_shape, 2),
                    "axcodes": "RAS"[:len(target)]},
        "patch": {**topo, "crop_size": crop},
        "network": net,
        "normalisation": norm,
        "loss": {"name": "boundary_weighted_dice_ce", "w0": W0, "sigma_mm": sigma,
                 "border_on": "background" if n_fg == 1 else "all", "class_weights": None, "lambda_dice": 1.0,
                 "lambda_ce": 1.0, "dice_include_background": False, "batch_dice": True},
        "sampling": {"batch_size": batch, "num_samples": 1, "pos_neg": [1, 2]},
        "augmentation": aug, "schedule": sched, "inference": infer, "warnings": warnings,
        "rationale": {
            "spacing": why_spacing, "dimensionality": why_dims, "patch_network_batch": why_patch,
            "normalisation": why_norm,
            "loss": why_sigma + ("; border term on background only (one foreground class: the paper's cells)"
                                 if n_fg == 1 else f"; border term everywhere ({n_fg} classes may touch)"),
            "sampling": (f"pos/neg 1:2, a third of the patches centred on foreground (nnU-Net's 33%); the "
                         f"rarest class {rare[1]!r} is {100 * rare[0]:.2g}% of the voxels"),
            "augmentation": why_aug, "schedule": why_sched, "inference": why_infer},
    }
    log.info("planned %s: %dD, spacing %s, patch %s, batch %d, filters %s", plan["name"], dims,
             plan["spacing"]["pixdim"], roi, batch, net["filters"])
    return plan


def write_plan(plan: dict, path: Path) -> Path:
    """Write ``plan`` as JSON to ``path`` (a folder, or one without a suffix, gets ``plan.json``)."""
    path = Path(path)
    path = path / "plan.json" if path.is_dir() or not path.suffix else path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(plan), indent=2))
    return path
