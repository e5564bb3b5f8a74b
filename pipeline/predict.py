"""Batch prediction: one model, many studies, bounded background reading and writing, resumable.

``predict(bundle_dir, input, output_dir)`` reads the bundle's ``common.json`` + ``inference.json``
(the ids in ``PREDICT_IDS``), loads the weights once and segments every study of ``input`` into
``output_dir/<study_id>.nii.gz`` (uint8, the source geometry), keeping ``output_dir/report.csv``
current. The masks are written by the bundle's own ``postprocessing`` (``pipeline.postprocess``),
with ``prediction_dir`` set to ``output_dir``: ``python -m monai.bundle run`` with the bundle's
``inference.json`` writes the same files.

Pipeline: one reader thread checks headers and runs the deterministic preprocessing of the next
``prefetch`` studies while the current one runs on the device; one writer thread runs the
post-processing (back to the source geometry, labels, clean-up, the mask file). Both queues are bounded, so memory
does not grow with the number of studies. A failing study becomes a ``failed`` row with a
one-line reason; the rest go on. Existing outputs are skipped (they are complete: see
``predict_io``), so a killed run is resumed by running the same command again.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import predict_io, predict_outputs
from pipeline import preview as preview_pages
from pipeline.bundle import bundle_metadata, get, load_bundle
from pipeline.errors import InputError, SegpipeError, UsageError, first_line
from pipeline.manifest import as_manifest
from pipeline.preview import write_index

log = logging.getLogger(__name__)

CONFIGS = ("common.json", "inference.json")


def predict(bundle_dir: Path, input: Path, output_dir: Path, shard: str | None = None,
            device: str | None = None, overrides: dict[str, Any] | None = None,
            progress: bool = True, prefetch: int = 2, output_format: str = "nifti",
            preview: bool = False) -> list[dict[str, Any]]:
    """Segment every study of ``input`` (NIfTI file, folder of NIfTI/DICOM studies, or manifest)
    of this shard; return one row per study (``status`` ok, failed or skipped). ``output_format``
    nifti, dicom-seg or both and ``preview`` (a PNG per study, ``index.html``): see
    ``pipeline.predict_outputs``. A run that fails before writing anything (a bad bundle or
    ``--set``, no studies) removes the output folder it made; nothing that existed is touched."""
    output_dir = Path(output_dir)
    predict_outputs.check_format(output_format)
    shard_i, shard_n = predict_io.parse_shard(shard)
    created = predict_io.check_output_dir(output_dir)  # before the work: an unwritable folder is said at once
    try:
        return _predict(Path(bundle_dir), input, output_dir, (shard_i, shard_n), device, overrides, progress,
                        prefetch, output_format, preview)
    except BaseException:  # a bad bundle, no studies, a bad --set ...: no empty folder left behind
        predict_io.remove_created(created)
        raise


def _predict(bundle_dir: Path, input: Path, output_dir: Path, shard: tuple[int, int], device: str | None,
             overrides: dict[str, Any] | None, progress: bool, prefetch: int, output_format: str,
             preview: bool) -> list[dict[str, Any]]:
    """``predict`` once the output folder exists."""
    shard_i, shard_n = shard
    from pipeline.validation import bundle_contract, check_contract

    if (manifest := as_manifest(input)).suffix.lower() == ".json":  # its labels and channels: the bundle's
        check_contract(Path(bundle_dir), manifest)
    channels = bundle_contract(Path(bundle_dir))[1]  # folders group <case>_0000.nii.gz.. when > 1
    studies = predict_io.take_shard(predict_io.list_studies(Path(input), channels, exclude=output_dir),
                                    shard_i, shard_n)  # fails fast
    model = load_model(bundle_dir, overrides, device, output_dir)
    model["metadata"] = bundle_metadata(Path(bundle_dir))  # the SEG's algorithm name, version and codes
    outputs = {"output_format": output_format, "preview": preview}
    predict_io.clean_stale_temps(output_dir)
    log.info("%d studies (shard %d/%d) -> %s", len(studies), shard_i, shard_n, output_dir)

    earlier = predict_io.read_report(output_dir)
    names = model["label_names"]
    rows: list[dict[str, Any]] = []
    todo = []
    for s in studies:
        files = predict_outputs.planned(s, output_dir, output_format, preview)
        if all(f.exists() for f in files.values()):
            row = earlier.get(s["id"], {})
            if not all(row.get(f"voxels_{n}") for n in names[1:]):  # killed before its row, or no report.csv
                row = {**row, **predict_outputs.recount_volumes(files, names)}
            rows.append({**row, "study_id": s["id"], "input": s["image"],
                         **predict_outputs.columns(s, files, output_format), "status": "skipped"})
        else:
            todo.append(s)
    if rows:
        predict_io.write_report(output_dir, rows, names)
    if preview:
        write_index(output_dir, names, running=True)
    bar = _progress_bar(len(studies), progress, initial=len(rows))
    with tempfile.TemporaryDirectory(prefix="segpipe-") as scratch, \
            ThreadPoolExecutor(1, thread_name_prefix="read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="write") as writer:
        reads: deque[tuple[dict, Future]] = deque()
        writes: deque[tuple[dict, float, Future]] = deque()
        queue = iter(todo)

        def refill() -> None:
            while len(reads) < prefetch and (s := next(queue, None)) is not None:
                reads.append((s, reader.submit(_read, s, model, Path(scratch), output_format)))

        index_due = time.monotonic() + preview_pages.INDEX_EVERY_S

        def finish(row: dict[str, Any]) -> None:
            nonlocal index_due
            rows.append(row)
            predict_io.write_report(output_dir, [row], names)
            if preview and time.monotonic() >= index_due:  # not after every study: the page is the
                t = time.monotonic()                            # whole report, so that would be quadratic
                write_index(output_dir, names, running=True)
                index_due = time.monotonic() + max(preview_pages.INDEX_EVERY_S, 20 * (time.monotonic() - t))
            bar.update(1)
            bar.set_postfix(failed=sum(r["status"] == "failed" for r in rows), refresh=False)

        def drain(limit: int) -> None:
            while len(writes) > limit:
                s, t0, fut = writes.popleft()
                finish(_row(s, t0, fut, output_dir))

        refill()
        while reads:
            s, fut = reads.popleft()
            refill()
            t0 = time.perf_counter()
            try:
                data = fut.result()
                pred = run_model(model, data["image"])
            except Exception as e:  # noqa: BLE001 - one bad study must not stop the batch
                finish(_failed(s, t0, e))
                continue
            writes.append((s, t0, writer.submit(write_study, s, data, pred, model, outputs)))
            drain(limit=1)  # at most one finished prediction waits to be written
        drain(limit=0)
    bar.close()
    if preview:
        log.info("previews: %s", write_index(output_dir, names, running=False))
    failed = [r for r in rows if r["status"] == "failed"]
    for r in failed:
        log.warning("%s: %s", r["study_id"], r["error"])
    return rows


#: the ids of common.json + inference.json that segpipe predict reads (every bundle declares them)
PREDICT_IDS = ("device", "predictor", "folds", "preprocessing", "inferer", "postprocessing",
               "prediction_dir", "label_names", "max_voxels", "in_channels", "spatial_dims")


def load_model(bundle_dir: Path, overrides: dict[str, Any] | None, device: str | None,
               output_dir: Path | None = None) -> dict[str, Any]:
    """Everything a study needs from the bundle, built once: the ``predictor`` (one network with
    its weights, or a fold ensemble: ``pipeline.ensemble``), preprocessing, inferer, the bundle's
    own ``postprocessing`` (writing into ``output_dir``) and limits. An override of ``model_path``
    without one of ``folds`` predicts with that file alone, also in a bundle that ships folds."""
    overrides = dict(overrides or {})
    if "model_path" in overrides and "folds" not in overrides:  # one given file, not the bundle's folds
        overrides["folds"] = []
    if device is None and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # torchrun: one GPU per rank
    if device is not None:
        overrides["device"] = f"$torch.device('{device}')"
    if output_dir is not None:
        overrides["prediction_dir"] = str(Path(output_dir).resolve())
    parser = load_bundle(Path(bundle_dir), CONFIGS, overrides)
    missing = [k for k in PREDICT_IDS if k not in parser]
    if missing:
        raise UsageError(f"{bundle_dir}: the inference configs lack id(s) {', '.join(missing)}")
    return {
        "network": get(parser, "predictor", bundle_dir), "device": torch.device(get(parser, "device", bundle_dir)),
        **{k: get(parser, k, bundle_dir) for k in ("preprocessing", "inferer", "postprocessing")},
        "label_names": list(get(parser, "label_names", bundle_dir)),
        **{k: int(parser.get_parsed_content(k)) for k in ("max_voxels", "in_channels", "spatial_dims")},
    }


def read_study(study: dict[str, Any], model: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """Check the header(s) (refusing before any voxel is read), convert DICOM, preprocess; refuse
    NaN or Inf voxels left after preprocessing. ``study["image"]`` is one file or folder, or a
    list of files, one per channel; a study listed with a ``problem`` fails with it."""
    from pipeline.dicom_series import dicom_series_to_nifti
    from pipeline.studies import read_header

    if study.get("problem"):
        raise InputError(study["problem"])
    files = study["image"] if isinstance(study["image"], list) else [study["image"]]
    # a 2D network run slice by slice (pipeline.slice_inference) takes volumes of one more dimension
    dims = model["spatial_dims"] + (getattr(model["inferer"], "slice_axis", None) is not None)
    paths = []
    for i, f in enumerate(files):
        path = Path(f)
        header = read_header(path, model["max_voxels"])
        if path.is_dir():
            path = dicom_series_to_nifti(path, scratch / f"{study['id']}_{i:04d}.nii.gz")
            read_header(path, model["max_voxels"])
        check_shape(path, header["shape"], dims, model["in_channels"] if len(files) == 1 else 1)
        paths.append(path)
    if len(paths) != 1 and len(paths) != model["in_channels"]:
        raise InputError(f"{paths[0]}: {len(paths)} channel files, the bundle expects {model['in_channels']}")
    try:
        data = model["preprocessing"]({"image": str(paths[0]) if len(paths) == 1 else [str(p) for p in paths]})
    except Exception as e:  # noqa: BLE001 - MONAI wraps the cause in pages of text
        raise InputError(f"{paths[0]}: cannot preprocess ({first_line(e)})") from None
    if not bool(torch.isfinite(data["image"]).all()):  # NaN would spread through every tile it reaches
        raise InputError(f"{paths[0]}: non-finite voxels (NaN or Inf) in the preprocessed image; refusing to predict")
    data["source"] = paths[0]
    return data


def check_shape(path: Path, shape: tuple[int, ...], spatial_dims: int, in_channels: int) -> None:
    """NIfTI shapes are (x, y[, z][, channels...]): refuse an image with fewer dimensions than
    the bundle (a 2D image for a 3D bundle) or the wrong number of channels, naming the file
    (a file of a one-file-per-channel list must have one)."""
    if len(shape) < spatial_dims:
        raise InputError(f"{path}: {len(shape)}D image {list(shape)} given to a {spatial_dims}D bundle")
    channels = int(np.prod(shape[spatial_dims:], dtype=np.int64))
    if channels != in_channels:
        raise InputError(f"{path}: {channels} channels in image {list(shape)}, the bundle expects {in_channels}")


def run_model(model: dict[str, Any], image: torch.Tensor) -> torch.Tensor:
    """The inferer's output for one preprocessed (C, *spatial) image: (K, *spatial) on the CPU."""
    pred = model["inferer"](image[None].to(model["device"]), model["network"])[0]
    return pred.cpu() if pred.device.type != "cpu" else pred


def _read(study: dict[str, Any], model: dict[str, Any], scratch: Path, output_format: str) -> dict[str, Any]:
    """``read_study``, after the source DICOM headers a SEG will reference (``predict_outputs``)."""
    sources = predict_outputs.read_sources(study, output_format)
    data = read_study(study, model, scratch)
    data["dicom_sources"] = sources
    return data


def write_study(study: dict[str, str], data: dict[str, Any], pred: torch.Tensor, model: dict[str, Any],
                outputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The bundle's ``postprocessing`` (``pipeline.postprocess``: back to the source geometry,
    labels, clean-up, ``<id>.nii.gz`` in the output folder given to ``load_model``), then the
    volume columns; with ``outputs`` (``output_format``, ``preview``) the DICOM SEG and preview
    too (``predict_outputs.write_extras``)."""
    from pipeline.postprocess import label_volumes

    d = model["postprocessing"]({"image": data["image"], "pred": pred, "id": study["id"]})
    voxel_ml = float(abs(np.linalg.det(np.asarray(data["image"].meta["original_affine"])[:3, :3]))) / 1000
    volumes = label_volumes(d["pred"], model["label_names"], voxel_ml)
    files = predict_outputs.write_extras(study, data, d, volumes, model, **outputs) if outputs else {}
    return {"output": d["output"], **volumes, **files}


def _row(study: dict[str, str], t0: float, fut: Future, output_dir: Path) -> dict[str, Any]:
    try:
        extra = fut.result()
    except Exception as e:  # noqa: BLE001
        return _failed(study, t0, e)
    return {"study_id": study["id"], "input": study["image"], "status": "ok", "error": "",
            "seconds": round(time.perf_counter() - t0, 3), **extra}


def _failed(study: dict[str, str], t0: float, e: BaseException) -> dict[str, Any]:
    msg = first_line(e) if isinstance(e, SegpipeError) else f"{study['image']}: {type(e).__name__}: {first_line(e)}"
    return {"study_id": study["id"], "input": study["image"], "output": "", "status": "failed", "error": msg,
            "seconds": round(time.perf_counter() - t0, 3)}


def _progress_bar(total: int, enabled: bool, initial: int = 0) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="study", desc="predict", disable=not enabled,
                dynamic_ncols=True)

