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
one-line reason; the rest go on.

Resume: existing outputs of this model are skipped (they are complete: see ``predict_io``), so a
killed run is resumed by running the same command again. "This model" is ``model_identity``:
the weights files' sha256, the bundle's name and version and the settings that change masks,
recorded in ``OUTPUT/.segpipe_model.json`` before the first mask and in each report row's
``model``. Outputs of another model are predicted again (one warning says how many and what
differs); see ``_attribute`` for outputs without a row.
"""

from __future__ import annotations

import contextlib
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
from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline import predict_io, predict_outputs, predict_stamp
from pipeline import preview as preview_pages
from pipeline.bundle import bundle_metadata, get, load_bundle
from pipeline.errors import InputError, SegpipeError, UsageError, first_line
from pipeline.fileio import temp_prefix
from pipeline.manifest import as_manifest
from pipeline.predict_stamp import UNKNOWN
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
    output_dir = Path(output_dir).absolute()  # report.csv names files absolutely, wherever a rerun starts
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
    log.info("%d stud%s (shard %d/%d) -> %s", len(studies), "y" if len(studies) == 1 else "ies", shard_i, shard_n,
             output_dir)

    names, identity = model["label_names"], model["identity"]
    rows, todo = _resume(studies, output_dir, identity, names, output_format, preview)
    if rows:
        predict_io.write_report(output_dir, rows, names)
    if todo:  # before the first mask: every output this run writes is attributable to its model
        predict_stamp.record_model(output_dir, identity, unattributed=any(r["model"] == UNKNOWN for r in rows))
    if preview:
        write_index(output_dir, names, running=True)
    bar = _progress_bar(len(studies), progress, initial=len(rows))
    try:
        with logging_redirect_tqdm() if progress else contextlib.nullcontext():  # log lines above the bar, not in it
            _run_batch(todo, rows, model, output_dir, names, outputs, bar, prefetch, preview)
    except BaseException:  # Ctrl-C, SIGTERM, a failure: the page lists what was done and says it stopped
        if preview:
            write_index(output_dir, names, running=False, stopped=True)
        done = sum(r["status"] in ("ok", "skipped") for r in rows)
        log.warning("stopped with %d of %d studies done (%s); the same command again does the rest", done,
                    len(studies), output_dir / predict_io.REPORT)
        raise
    finally:
        bar.close()  # its line ends before what comes next (the summary, or why the run stopped)
    if preview or (output_dir / preview_pages.INDEX).is_file():  # an earlier run's page: kept true to report.csv
        log.info("previews: %s", write_index(output_dir, names, running=False))
    failed = [r for r in rows if r["status"] == "failed"]
    for r in failed:
        log.warning("%s: %s", r["study_id"], r["error"])
    return rows


def _run_batch(todo: list[dict[str, Any]], rows: list[dict[str, Any]], model: dict[str, Any], output_dir: Path,
               names: list[str], outputs: dict[str, Any], bar: Any, prefetch: int, preview: bool) -> None:
    """Predict the studies of ``todo``, appending their rows to ``rows`` (report.csv and, now and
    then, index.html kept current): reading ahead and writing behind in a thread each."""
    identity, output_format = model["identity"], outputs["output_format"]
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
            row["model"] = identity["id"]
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

        try:
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
        finally:  # also on Ctrl-C: the study being written is finished and gets its row
            drain(limit=0)


def _resume(studies: list[dict[str, Any]], output_dir: Path, identity: dict[str, Any], names: list[str],
            output_format: str, preview: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split ``studies`` into the rows of those whose outputs are all there and are kept
    (``skipped``: this model's, or of no known model) and those to predict (no outputs yet, or
    another model's). Warns once about each kind that is not plainly this model's."""
    earlier, stamp = predict_io.read_report(output_dir), predict_stamp.read_stamp(output_dir)
    rows: list[dict[str, Any]] = []
    todo: list[dict[str, Any]] = []
    again: dict[str, list[str]] = {}  # why -> ids predicted again
    for s in studies:
        files = predict_outputs.planned(s, output_dir, output_format, preview)
        if not any(f.exists() for f in files.values()):
            todo.append(s)
            continue
        row = earlier.get(s["id"], {})
        made_by = _attribute(row, stamp, identity["id"])
        if made_by not in (identity["id"], UNKNOWN):  # said even where this run asks for more (--preview)
            why = (predict_stamp.model_difference((stamp or {}).get("models", {}).get(made_by), identity) if made_by
                   else "no report row says which model made them, and other models wrote into this folder")
            again.setdefault(why, []).append(s["id"])
            todo.append(s)
            if not preview:  # the other model's picture would stay beside this model's mask
                predict_outputs.planned(s, output_dir, output_format, True)["preview"].unlink(missing_ok=True)
            continue
        if not all(f.exists() for f in files.values()):  # this model's, and this run asks for more
            todo.append(s)
            continue
        if not all(row.get(f"voxels_{n}") for n in names[1:]):  # killed before its row, or no report.csv
            row = {**row, **predict_outputs.recount_volumes(files, names)}
        rows.append({**row, "study_id": s["id"], "input": s["image"],
                     **predict_outputs.columns(s, files, output_format), "status": "skipped", "model": made_by})
    if again:
        log.warning("%s: %d existing output(s) were made by another model than this one (%s) and are predicted "
                    "again: %s", output_dir, sum(map(len, again.values())), identity["id"],
                    "; ".join(f"{why} ({_some(ids)})" for why, ids in again.items()))
    unknown = [r["study_id"] for r in rows if r["model"] == UNKNOWN]
    if unknown:
        log.warning("%s: %d existing output(s) are kept although no record says which model made them (written "
                    "by a segpipe that did not record models): %s; delete them to predict them again with this "
                    "model", output_dir, len(unknown), _some(unknown))
    return rows, todo


def _attribute(row: dict[str, str], stamp: dict[str, Any] | None, current: str) -> str:
    """The model that made a study's existing outputs: its report row's ``model`` (of a row that
    is ``ok`` or ``skipped``: a ``failed`` attempt may have left another model's files). Without
    one (a run killed between a mask and its row, a deleted report.csv, a row of an older
    segpipe) the folder's stamp decides: none at all, or one that records unattributed outputs,
    is ``UNKNOWN`` (kept, as before models were recorded); only this model recorded: this
    model's; one other model alone: that one's; several: "" (cannot tell: predicted again)."""
    if row.get("model") and row.get("status") in ("ok", "skipped"):
        return row["model"]
    if stamp is None or stamp.get("unattributed"):
        return UNKNOWN
    models = set(stamp["models"])
    if models <= {current}:
        return current
    others = models - {current}
    return next(iter(others)) if len(others) == 1 and current not in models else ""


def _some(ids: list[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


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
    network = get(parser, "predictor", bundle_dir)  # loads the weights: the files exist and fit
    weights = get(parser, "weights", bundle_dir) if "weights" in parser else [get(parser, "model_path", bundle_dir)]
    return {
        "network": network, "device": torch.device(get(parser, "device", bundle_dir)),
        "identity": predict_stamp.model_identity(bundle_metadata(Path(bundle_dir)), [Path(p) for p in weights],
                                              predict_stamp.mask_settings(parser)),
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
    from pipeline.postprocess import label_volumes, voxel_size

    d = {"image": data["image"], "pred": pred, "id": study["id"]}
    if outputs and outputs["output_format"] == "dicom-seg":  # a SEG alone: the
        d["mask_file"] = f"{temp_prefix()}{study['id']}.nii.gz"  # NIfTI it is made from must not replace a mask
    d = model["postprocessing"](d)
    prefix, size = voxel_size(data["image"].meta["original_affine"], model["spatial_dims"])
    volumes = label_volumes(d["pred"], model["label_names"], size, prefix)
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

