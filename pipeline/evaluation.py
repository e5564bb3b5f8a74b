"""Dice, HD95 and surface Dice (NSD) of predicted masks per case and class, and their summary.

``case_metrics`` is the plain function (arrays in, numbers out) that training QC, the demo and the
benchmarks call; ``evaluate`` runs it over a folder of predicted NIfTI masks against a reference
manifest and writes ``metrics.csv`` and ``metrics_summary.json`` (and logs to MLflow if asked: to
a run named by its id or found from the training's output folder).

Empty masks, per class (documented conventions):

- reference and prediction both empty: Dice 1, HD95 0 mm, NSD 1 (perfect agreement on absence);
  counted as ``n_both_empty`` in the summary.
- exactly one of them empty: Dice 0, NSD 0, HD95 undefined (MONAI gives inf): reported as NaN,
  left out of the HD95 mean/median/std and counted as ``n_hd95_undefined``.

Distances are in millimetres: MONAI's metric functions get the reference file's voxel spacing.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError
from pipeline.fileio import atomic_path, read_label
from pipeline.studies import is_nifti, study_id

log = logging.getLogger(__name__)

CSV_COLUMNS = ["study_id", "class", "dice", "hd95_mm", "surface_dice", "ref_voxels", "pred_voxels", "error"]
SUMMARY_NAME = "metrics_summary.json"
#: the name ending of the probabilities that ``segpipe predict`` may write beside a mask (not a mask)
PROBABILITIES = "_probs"


def _label_names(labels: Mapping[Any, str] | Sequence[str]) -> dict[int, str]:
    """Foreground classes as {index: name}: from an MSD ``labels`` dict or a list of names (index = position)."""
    items = labels.items() if isinstance(labels, Mapping) else enumerate(labels)
    return {int(k): str(v) for k, v in sorted(items, key=lambda kv: int(kv[0])) if int(k) != 0}


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                 labels: Mapping[Any, str] | Sequence[str], tolerance_mm: float = 1.0) -> dict[str, dict[str, Any]]:
    """Metrics of one case for every foreground class, keyed by class name.

    ``pred`` and ``ref`` are integer label maps of the same shape (2D or 3D), ``spacing`` the voxel
    size in mm per axis, ``labels`` an MSD ``labels`` dict ({"0": "background", "1": "liver"}) or a
    list of names; ``tolerance_mm`` the NSD tolerance. Each value is
    ``{"dice", "hd95_mm", "surface_dice", "ref_voxels", "pred_voxels"}`` (see the module docstring
    for empty masks).

    >>> ref = np.zeros((8, 8, 8), int); ref[2:6, 2:6, 2:6] = 1
    >>> case_metrics(ref, ref, (1.0, 1.0, 2.0), ["background", "organ"])["organ"]["dice"]
    1.0
    """
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    spacing = [float(s) for s in spacing]
    if len(spacing) != ref.ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} values for a {ref.ndim}D volume")
    out: dict[str, dict[str, Any]] = {}
    for index, name in _label_names(labels).items():
        p, r = pred == index, ref == index
        n_pred, n_ref = int(p.sum()), int(r.sum())
        row: dict[str, Any] = {"ref_voxels": n_ref, "pred_voxels": n_pred}
        if n_pred == 0 and n_ref == 0:
            row.update(dice=1.0, hd95_mm=0.0, surface_dice=1.0)
        elif n_pred == 0 or n_ref == 0:
            row.update(dice=0.0, hd95_mm=math.nan, surface_dice=0.0)
        else:
            box = _union_box(p, r)  # outside it both masks are empty: no metric changes, much faster
            yp = torch.from_numpy(p[box])[None, None].float()
            yr = torch.from_numpy(r[box])[None, None].float()
            row["dice"] = float(compute_dice(yp, yr, include_background=True, ignore_empty=False)[0, 0])
            with warnings.catch_warnings():  # neither mask is empty here; MONAI's warnings would be noise
                warnings.simplefilter("ignore")
                hd = float(compute_hausdorff_distance(yp, yr, include_background=True, percentile=95,
                                                      spacing=spacing)[0, 0])
                nsd = float(compute_surface_dice(yp, yr, [float(tolerance_mm)], include_background=True,
                                                 spacing=spacing)[0, 0])
            row.update(hd95_mm=hd if math.isfinite(hd) else math.nan, surface_dice=nsd)
        out[name] = row
    return out


def _union_box(p: np.ndarray, r: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of ``p | r`` grown by one voxel (so surface voxels stay surface voxels)."""
    from scipy import ndimage

    box = ndimage.find_objects((p | r).view(np.uint8))[0]
    return tuple(slice(max(b.start - 1, 0), min(b.stop + 1, n)) for b, n in zip(box, p.shape, strict=True))


def _find_prediction(pred_dir: Path, sid: str) -> Path | None:
    for ext in (".nii.gz", ".nii"):
        if (pred_dir / f"{sid}{ext}").is_file():
            return pred_dir / f"{sid}{ext}"
    return None


def _is_mask(path: Path) -> bool:
    """Whether a file of the prediction folder is a mask ``<id>.nii.gz``: not the probabilities
    ``segpipe predict`` writes beside it (``<id>_probs.nii.gz``, ``pipeline.postprocess.SaveMaskd``),
    nor a hidden temp file of a run still writing (``.tmp-...``, ``pipeline.fileio.atomic_path``)."""
    return (is_nifti(path) and not path.name.startswith(".") and not study_id(path).endswith(PROBABILITIES)
            and path.is_file())


def _evaluate_case(pred_path: Path, ref_path: Path, labels: Mapping[Any, str], tolerance_mm: float,
                   affine_tol: float) -> dict[str, dict[str, Any]]:
    pred, pred_affine, _ = read_label(pred_path)
    ref, ref_affine, spacing = read_label(ref_path)
    pred = to_reference_grid(pred, pred_affine, ref.shape, ref_affine, affine_tol, pred_path, ref_path)
    return case_metrics(pred, ref, spacing, labels, tolerance_mm)


def to_reference_grid(pred: np.ndarray, pred_affine: np.ndarray, ref_shape: Sequence[int],
                      ref_affine: np.ndarray, affine_tol: float, pred_path: Path | str,
                      ref_path: Path | str) -> np.ndarray:
    """``pred`` on the reference's grid, in the reference's voxel order: as it is when its shape
    and affine match the reference's (within ``affine_tol`` mm); reoriented when it is the same
    grid stored in another orientation (axes flipped or permuted, its affine mapping every voxel
    to the same world position: nibabel's ``io_orientation``, ``ornt_transform`` and
    ``apply_orientation``, then the affines compared again). Otherwise one InputError line naming
    the file: its shape or affine differs from the reference's (and, where its orientation
    differs too, both orientations). A 2D map is taken as one slice of a 3D one."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    ref_shape = tuple(int(n) for n in ref_shape)
    if pred.shape == ref_shape and np.allclose(pred_affine, ref_affine, atol=affine_tol, rtol=0):
        return pred
    what = f"{pred_path}: "
    src, dst = io_orientation(pred_affine), io_orientation(ref_affine)
    transform = None if np.isnan(src).any() or np.isnan(dst).any() else ornt_transform(src, dst)
    if transform is not None and (transform != [[0, 1], [1, 1], [2, 1]]).any():  # another orientation
        pred3 = pred.reshape(pred.shape + (1,) * (3 - pred.ndim))
        moved = apply_orientation(pred3, transform)
        moved_affine = pred_affine @ inv_ornt_aff(transform, pred3.shape)
        ref3 = ref_shape + (1,) * (3 - len(ref_shape))
        if moved.shape == ref3 and np.allclose(moved_affine, ref_affine, atol=affine_tol, rtol=0):
            log.info("%s: orientation %s reoriented to the reference's %s (%s)", pred_path,
                     _axcodes(pred_affine), _axcodes(ref_affine), ref_path)
            return moved.reshape(ref_shape)
        what += (f"orientation {_axcodes(pred_affine)} differs from the reference's {_axcodes(ref_affine)} "
                 "and, reoriented to it, its ")
        pred, pred_affine, ref_shape = moved, moved_affine, ref3
    if pred.shape != ref_shape:
        raise InputError(f"{what}shape {pred.shape} differs from reference {ref_path} shape {ref_shape}")
    worst = float(np.abs(pred_affine - ref_affine).max())
    raise InputError(f"{what}affine differs from reference {ref_path} by up to {worst:.4g} (tolerance {affine_tol:g})")


def _axcodes(affine: np.ndarray) -> str:
    """The voxel axes' world directions, e.g. ``RAS`` or ``LPS`` (nibabel's axis codes)."""
    import nibabel as nib

    return "".join(c or "?" for c in nib.aff2axcodes(affine))


def _stats(values: list[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
    if v.size == 0:
        return {"mean": math.nan, "median": math.nan, "std": math.nan}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std())}


def summarise(rows: list[dict[str, Any]], class_names: list[str]) -> dict[str, Any]:
    """Per-class mean/median/std of the metric rows (error rows left out) and means over classes."""
    per_class: dict[str, dict[str, Any]] = {}
    for name in class_names:
        ok = [r for r in rows if r["class"] == name and not r["error"]]
        entry: dict[str, Any] = {"n": len(ok)}
        for metric, key in (("dice", "dice"), ("hd95", "hd95_mm"), ("nsd", "surface_dice")):
            for stat, value in _stats([float(r[key]) for r in ok]).items():
                entry[f"{metric}_{stat}"] = value
        entry["n_hd95_undefined"] = sum(math.isnan(float(r["hd95_mm"])) for r in ok)
        entry["n_both_empty"] = sum(r["ref_voxels"] == 0 and r["pred_voxels"] == 0 for r in ok)
        per_class[name] = entry

    def over_classes(key: str) -> float:
        v = [c[key] for c in per_class.values() if not math.isnan(c[key])]
        return float(np.mean(v)) if v else math.nan

    return {"per_class": per_class, "mean_dice": over_classes("dice_mean"),
            "mean_hd95_mm": over_classes("hd95_mean"), "mean_nsd": over_classes("nsd_mean")}


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})


def find_training_run(run: str, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """``(run id, tracking URI)`` of ``run``: a run id as given (with ``tracking_uri``), or a
    training's output folder, whose ``checkpoints/mlflow_run.json`` names the run and its store
    (an explicit ``tracking_uri`` wins). A folder without that file is one InputError line."""
    path = Path(run)
    if not path.exists():
        return run, tracking_uri
    candidates = [path] if path.is_file() else [path / "checkpoints" / "mlflow_run.json", path / "mlflow_run.json"]
    for f in candidates:
        if f.is_file():
            try:
                saved = json.loads(f.read_text())
                return str(saved["run_id"]), tracking_uri or saved.get("tracking_uri")
            except (ValueError, KeyError, TypeError) as e:
                raise InputError(f"{f}: not a training's run file ({e})") from None
    raise InputError(f"{run}: not a training output folder (no checkpoints/mlflow_run.json); "
                     "give the MLflow run id instead")


def check_run(run_id: str, tracking_uri: str | None = None) -> Any:
    """The MLflow client of ``tracking_uri`` once ``run_id`` is found there; else one InputError line."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException as e:
        raise InputError(f"MLflow run {run_id} not found in {client.tracking_uri}: {e.message}") from None
    return client


def log_to_mlflow(summary: dict[str, Any], files: list[Path], run_id: str, tracking_uri: str | None = None) -> None:
    """Log ``eval/dice_<label>``, ``eval/hd95_<label>``, ``eval/nsd_<label>``, ``eval/mean_dice`` ...
    (finite values only; flat names ``eval_*`` mapped by ``pipeline.tracking.mlflow_key``), the
    reference manifest as an evaluation dataset input, ``files`` (under ``evaluation/``) and
    ``metrics_summary.png`` beside the first of them (every class on shared axes; also the image
    ``eval/summary``) to an existing MLflow run."""
    from mlflow.entities import Metric

    from pipeline.manifest import manifest_hash
    from pipeline.tracking import dataset_input, manifest_dataset, mlflow_key
    from pipeline.tracking_store import class_metric_name

    client = check_run(run_id, tracking_uri)
    values = {"eval_mean_dice": summary["mean_dice"], "eval_mean_hd95": summary["mean_hd95_mm"],
              "eval_mean_nsd": summary["mean_nsd"], "eval_n_cases": summary["n_cases"],
              "eval_n_missing": len(summary["missing"])}
    for name, c in summary["per_class"].items():
        key = class_metric_name(name)
        values.update({f"eval_dice_{key}": c["dice_mean"], f"eval_hd95_{key}": c["hd95_mean"],
                       f"eval_nsd_{key}": c["nsd_mean"]})
    now = int(time.time() * 1000)
    metrics = [Metric(mlflow_key(k), float(v), now, 0) for k, v in values.items() if math.isfinite(float(v))]
    client.log_batch(run_id, metrics=metrics)
    ref = Path(summary["ref_manifest"])
    if ref.is_file():
        record = {**manifest_dataset(ref, manifest_hash(ref)), "context": "evaluation"}
        client.log_inputs(run_id, [dataset_input(record)])
    if summary["per_class"] and files:  # the numbers on shared axes, as one picture
        from PIL import Image

        from pipeline.progress import plot_evaluation

        figure = plot_evaluation(summary, Path(files[0]).with_name("metrics_summary.png"))
        files = [*files, figure]
        with Image.open(figure) as image:
            client.log_image(run_id, image.convert("RGB"), key="eval/summary", step=0)
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path="evaluation")
    log.info("logged %d evaluation metrics and %d files to MLflow run %s", len(metrics), len(files), run_id)


def evaluate(pred_dir: Path, ref_manifest: Path, out_csv: Path | None = None, run_id: str | None = None,
             tracking_uri: str | None = None, tolerance_mm: float = 1.0, affine_tol: float = 1e-3) -> dict[str, Any]:
    """Evaluate ``pred_dir/<id>.nii.gz`` against the labels of the manifest's ``training`` entries.

    Writes the per-case CSV (default ``pred_dir/metrics.csv``; one row per case and foreground
    class, or one error row for a case that could not be compared: missing prediction, shape or
    affine mismatch, unreadable file; a mask of the reference's grid stored in another orientation
    is reoriented to the reference, ``to_reference_grid``) and ``metrics_summary.json`` beside it,
    logs to MLflow run ``run_id`` if given (a run id, or the training's output folder:
    ``find_training_run``), and returns the summary (``extra_predictions``: the ids of masks
    without a reference, not counting ``<id>_probs`` probabilities). Raises InputError when no
    prediction matches.
    """
    from pipeline.manifest import load_manifest

    if run_id:  # before the work: a wrong folder or run id is said at once, nothing written
        run_id, tracking_uri = find_training_run(run_id, tracking_uri)
        check_run(run_id, tracking_uri)
    pred_dir, ref_manifest = Path(pred_dir), Path(ref_manifest)
    if not pred_dir.is_dir():
        raise InputError(f"{pred_dir}: prediction folder not found")
    manifest = load_manifest(ref_manifest)
    labels = manifest.get("labels") or {}
    class_names = list(_label_names(labels).values())
    if not class_names:
        raise InputError(f"{ref_manifest}: no foreground classes in 'labels'")
    entries = [e for e in manifest.get("training", []) if e.get("label")]
    ids = [e.get("id") or study_id(e["label"]) for e in entries]
    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    errors: dict[str, str] = {}
    for sid, entry in zip(ids, entries, strict=True):
        pred_path = _find_prediction(pred_dir, sid)
        if pred_path is None:
            missing.append(sid)
            rows.append(_error_row(sid, f"missing prediction {pred_dir / (sid + '.nii.gz')}"))
            continue
        try:
            per_class = _evaluate_case(pred_path, Path(entry["label"]), labels, tolerance_mm, affine_tol)
        except InputError as e:
            errors[sid] = str(e)
            rows.append(_error_row(sid, str(e)))
            log.warning("%s", e)
            continue
        rows.extend({"study_id": sid, "class": name, **m, "error": ""} for name, m in per_class.items())
    if len(missing) == len(entries):
        raise InputError(f"{pred_dir}: none of the {len(entries)} studies of {ref_manifest} has a prediction "
                         f"<id>.nii.gz here (e.g. {ids[0] + '.nii.gz' if ids else 'none listed'})")
    if errors and len(missing) + len(errors) == len(entries):
        first = next(iter(errors.values()))
        raise InputError(f"{pred_dir}: none of the {len(entries)} studies of {ref_manifest} could be compared "
                         f"({len(errors)} refused, {len(missing)} missing; e.g. {first})")
    if missing:
        log.warning("%d of %d studies have no prediction in %s: %s", len(missing), len(entries), pred_dir,
                    ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    known = set(ids)
    extra = sorted(sid for p in pred_dir.iterdir() if _is_mask(p) and (sid := study_id(p)) not in known)

    out_csv = Path(out_csv) if out_csv else pred_dir / "metrics.csv"
    _write_csv(rows, out_csv)
    summary = {
        "n_cases": len(entries) - len(missing) - len(errors), "n_reference": len(entries),
        **summarise(rows, class_names),
        "missing": missing, "errors": errors, "extra_predictions": extra,
        "tolerance_mm": tolerance_mm, "pred_dir": str(pred_dir), "ref_manifest": str(ref_manifest),
        "csv": str(out_csv),
    }
    summary_path = out_csv.parent / SUMMARY_NAME
    with atomic_path(summary_path) as tmp:
        tmp.write_text(json.dumps(json_safe(summary), indent=2))
    log.info("evaluated %d of %d studies: mean Dice %.4f; wrote %s and %s", summary["n_cases"], len(entries),
             summary["mean_dice"], out_csv, summary_path)
    if run_id:
        log_to_mlflow(summary, [out_csv, summary_path], run_id, tracking_uri)
    return summary


def _error_row(sid: str, error: str) -> dict[str, Any]:
    return {"study_id": sid, "class": "", "dice": math.nan, "hd95_mm": math.nan, "surface_dice": math.nan,
            "ref_voxels": "", "pred_voxels": "", "error": error}


def json_safe(obj: Any) -> Any:
    """NaN -> null so the JSON is standard (Python's json would write the non-standard NaN)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj
