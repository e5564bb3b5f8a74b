"""Files around batch prediction: which studies, shards, weights, atomic outputs and report.csv.

Completeness rule: a mask is written to a hidden temp name in the output folder
(``.tmp-<pid>.<host>-<id>.nii.gz``, ``pipeline.fileio.atomic_path``) and renamed with ``os.replace``, so an
existing ``<id>.nii.gz`` is always complete; temp files of this machine's processes that no longer run are
deleted at the next start, another machine's (shards sharing a folder) only once a day old.
``report.csv`` is merged and rewritten the same way under a lock, so several shards writing to
one folder keep each other's rows.

Which model made the masks: ``pipeline.predict_stamp``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import IterableDataset
from monai.transforms import apply_transform
from torch.utils.data import get_worker_info

from pipeline.errors import InputError, SegpipeError, UsageError, first_line
from pipeline.fileio import (
    HOST,
    atomic_path,
    locked,
    pid_alive,
    remove_made_folders,
    temp_prefix,
    write_nifti,
)

log = logging.getLogger(__name__)

REPORT = "report.csv"
BASE_COLUMNS = ["study_id", "input", "output", "status", "error", "seconds", "model"]
_TMP = re.compile(r"^\.tmp-(\d+)(?:\.([0-9a-f]{8}))?-")  # pid, host (absent in names from before hosts)
#: another machine's temp file this old is a dead run's: its pid cannot be checked from here
STALE_ELSEWHERE_S = 24 * 3600


# ---------------------------------------------------------------- studies and shards

class StudyStream(IterableDataset):
    """The studies (``inference.json``) or cases (``evaluate.json``) of a bundle run with
    ``python -m monai.bundle run``: common.json's ``dataset``, preprocessed one at a time. A study that cannot be read or preprocessed is logged (its file,
    the cause's first line) and left out, so that one bad study never stops the others;
    :func:`exit_if_failed` ends the run with exit status 1 when any was. (``segpipe predict``
    reads studies itself and reports such a study in ``report.csv``.)"""

    def __init__(self, data: Sequence[dict[str, Any]], transform: Any) -> None:
        super().__init__(data, transform)
        self.failed: list[str] = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        with tempfile.TemporaryDirectory(prefix="segpipe-") as scratch:
            converted: list[Path] = []
            for i, study in enumerate(self.data):
                if i % workers != worker:
                    continue
                for f in converted:  # the previous study's, written and done with
                    f.unlink(missing_ok=True)
                try:
                    readable, converted = _series_as_nifti(study, Path(scratch), i)
                    yield apply_transform(self.transform, readable)
                except Exception as e:  # noqa: BLE001 - any reading or preprocessing failure of this study
                    cause = e
                    while cause.__cause__ is not None:  # MONAI wraps it: "applying transform <...>"
                        cause = cause.__cause__
                    image = study.get("image")
                    where = image[0] if isinstance(image, list) else image
                    msg = str(cause) if isinstance(cause, SegpipeError) else (
                        f"{where}: {type(cause).__name__}: {first_line(cause)}")
                    log.error("study %s left out: %s", study.get("id", i), msg)
                    self.failed.append(msg)


def _series_as_nifti(study: dict[str, Any], scratch: Path, i: int) -> tuple[dict[str, Any], list[Path]]:
    """``study`` with each DICOM series folder of its ``image`` written as NIfTI in ``scratch``
    (``pipeline.dicom_series``: the series ``segpipe predict`` reads, with its checks; MONAI's
    loader would read every file of the folder, a scout or a dose screenshot beside the CT too),
    and the files written."""
    from pipeline.dicom_series import dicom_series_to_nifti

    image = study.get("image")
    files = image if isinstance(image, list) else [image]
    if not any(isinstance(f, (str, Path)) and Path(f).is_dir() for f in files):
        return study, []
    written, out = [], []
    for k, f in enumerate(files):
        if isinstance(f, (str, Path)) and Path(f).is_dir():
            written.append(dicom_series_to_nifti(Path(f), scratch / f"{i:06d}_{k:04d}.nii.gz"))
            out.append(str(written[-1]))
        else:
            out.append(f)
    return {**study, "image": out if isinstance(image, list) else out[0]}, written


def exit_if_failed(dataset: Any) -> None:
    """After a bundle's inference or evaluate run: exit with status 1, naming how many were left out,
    when ``dataset`` (a :class:`StudyStream`) left any out (counted in this process: the bundles
    load studies with ``num_workers`` 0)."""
    failed = getattr(dataset, "failed", [])
    if failed:
        log.error("%d of %d studies could not be read and have no mask (first: %s); masks written for the other %d",
                  len(failed), len(dataset.data), failed[0], len(dataset.data) - len(failed))
        raise SystemExit(1)



def list_studies(input_path: Path, channels: int = 1, exclude: Path | None = None) -> list[dict[str, Any]]:
    """``[{"id", "image"}]`` sorted by id for a NIfTI file, a DICOM series folder, a folder of
    studies or a manifest (its ``test`` entries, else its ``training`` images; a folder that holds a
    ``dataset.json`` is that manifest, so its label maps are never taken for studies). Files under
    ``exclude`` (the output folder, where it lies inside the input) are not studies either: a rerun
    must not segment the masks of the first run. An ``image`` is a
    list of files, one per channel, where a manifest lists them so or, with ``channels`` > 1, where
    a folder holds ``<case>_0000.nii.gz`` .. (``pipeline.studies.find_studies``)."""
    from pipeline.dicom_files import starts_as_dicom
    from pipeline.manifest import as_manifest
    from pipeline.studies import find_studies, is_nifti, study_id

    p = Path(input_path)
    if not p.exists():
        raise UsageError(f"{p}: no such file or folder")  # a mistyped --input: exit 2, as a bad bundle path
    if (m := as_manifest(p)) != p:  # a dataset folder: its labels are not studies
        log.info("%s holds a dataset.json: predicting its test cases (else its training images)", p)
        p = m
    if p.is_file() and p.suffix.lower() == ".json":
        from pipeline.manifest import load_manifest

        m = load_manifest(p)
        entries = m.get("test") or m.get("training") or []
        studies = [{"id": str(e["id"]), "image": e["image"] if isinstance(e["image"], list) else str(e["image"])}
                   for e in entries]
    elif p.is_file():
        studies = [{"id": study_id(p) if is_nifti(p) else p.name, "image": str(p.absolute())}]
    else:
        studies = find_studies(p, strict=False, channels=int(channels))  # a bad study fails as its own
        entries = [c for c in p.iterdir() if not c.name.startswith(".")]
        if not studies and entries and not any(c.is_dir() for c in entries) and any(
                c.suffix.lower() in ("", ".dcm", ".dicom", ".ima") or starts_as_dicom(c) for c in entries):
            studies = [{"id": p.name, "image": str(p.absolute())}]  # a DICOM folder that fails as one study, by name
    if exclude is not None:
        from pipeline.manifest import image_files

        out = Path(os.path.abspath(exclude))  # not resolve(): a study may be a symlink loop (it fails alone)
        studies = [s for s in studies
                   if not any(Path(os.path.abspath(f)).is_relative_to(out) for f in image_files(s["image"]))]
    if not studies:
        raise InputError(f"{p}: no studies (NIfTI files or DICOM series) found")
    return sorted(studies, key=lambda s: s["id"])


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n; None -> torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if shard is None:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        return (int(os.environ.get("RANK", "0") or 0), world) if world > 1 else (0, 1)
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(shard))
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise UsageError(f"--shard expects i/n with 0 <= i < n (e.g. 0/4), got {shard!r}")
    return int(m.group(1)), int(m.group(2))


def take_shard(studies: Sequence[dict[str, str]], index: int, count: int) -> list[dict[str, str]]:
    """Every ``count``-th study of the id-sorted list, starting at ``index``."""
    return sorted(studies, key=lambda s: s["id"])[index::count]


# ---------------------------------------------------------------- weights


def load_weights(network: Any, path: Path) -> Any:
    """Load ``path`` (a state_dict, or a checkpoint dict holding one under "network", "model" or
    "state_dict") into ``network`` strictly. A missing or mismatched file is an InputError."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no weights; train the bundle first (segpipe train) or copy a model.pt "
                         "there - refusing to predict with random weights")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and torch errors alike
        raise InputError(f"{path}: cannot load weights ({first_line(e)})") from None
    for key in ("network", "model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise InputError(f"{path}: not a state_dict or a checkpoint with a 'network'/'model' entry")
    obj = {k.removeprefix("module."): v for k, v in obj.items()}
    try:
        network.load_state_dict(obj, strict=True)
    except RuntimeError as e:
        raise InputError(f"{path}: weights do not fit the bundle's network_def ({_misfit(network, obj) or first_line(e)}); "
                         "trained with other network settings? --set them as they were") from None
    return network


def _misfit(network: Any, weights: dict[str, Any]) -> str:
    """What first differs between ``weights`` and ``network``'s own, for a user: a tensor of
    another shape, else the names one has and the other lacks ("" where nothing is found)."""
    own = network.state_dict()
    shapes = [f"{k} is {list(v.shape)} in the file, {list(own[k].shape)} in the network" for k, v in weights.items()
              if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    missing, extra = [k for k in own if k not in weights], [k for k in weights if k not in own]
    said = (shapes[:1] + [f"the file lacks {k}" for k in missing[:1]] + [f"the network has no {k}" for k in extra[:1]])[:2]
    more = len(shapes) + len(missing) + len(extra) - len(said)
    return "; ".join(said) + (f" (and {more} more)" if more > 0 else "")


# ---------------------------------------------------------------- output folder and masks


def check_output_dir(out_dir: Path) -> list[Path]:
    """Create ``out_dir`` (and its missing parents) and prove it writable, before any work; else an
    InputError, leaving no folder it made. Returns the folders it made, outermost first, for
    :func:`remove_created` should the run fail before writing anything."""
    out_dir = Path(out_dir)
    created: list[Path] = []
    try:
        created = _make_dirs(out_dir)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=f"{temp_prefix()}probe"):
            pass
    except OSError as e:
        remove_created(created)
        raise InputError(f"{out_dir}: output folder is not writable ({e.strerror or e})") from None
    return created


def _make_dirs(out_dir: Path) -> list[Path]:
    """``mkdir -p out_dir``, one level at a time, returning the folders this call made (not those
    another process made meanwhile), outermost first."""
    missing = []
    d = Path(os.path.abspath(out_dir))
    while not os.path.lexists(d) and d != d.parent:
        missing.append(d)
        d = d.parent
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            if not d.is_dir():
                raise
            continue  # made by someone else meanwhile (a shard starting beside this one): not ours
        created.append(d)
    return created


def remove_created(created: Sequence[Path]) -> None:
    """Remove the folders :func:`check_output_dir` made, innermost first, each only while empty
    (``rmdir``): a run that failed before writing anything leaves nothing behind, and nothing
    else (a folder that existed, a file anyone put there) is ever deleted."""
    removed = remove_made_folders(list(reversed(list(created))))
    if removed:
        log.info("removed %s: made by this run, which wrote nothing", ", ".join(map(str, removed)))


def clean_stale_temps(out_dir: Path) -> int:
    """Delete temp files left by processes that no longer run (a killed run); keep live ones. A
    pid means something only on its own machine: another machine's temp file (a shard writing to
    the same shared folder) is left alone until it is ``STALE_ELSEWHERE_S`` old."""
    removed, now = 0, time.time()
    for f in Path(out_dir).iterdir():
        m = _TMP.match(f.name)
        if not m:
            continue
        try:
            if m.group(2) in (None, HOST):
                if pid_alive(int(m.group(1))):
                    continue
            elif now - f.stat().st_mtime < STALE_ELSEWHERE_S:
                continue
            f.unlink()
            removed += 1
        except OSError:
            pass
    if removed:
        log.info("removed %d temp file(s) of an interrupted run in %s", removed, out_dir)
    return removed


def _geometry(source: Path, affine: np.ndarray | None) -> dict[str, Any]:
    """Copy a NIfTI source's header geometry; for another source (a DICOM series folder read
    by MONAI) use ``affine``, the source grid's RAS affine."""
    from pipeline.studies import is_nifti

    if is_nifti(source) or affine is None:
        return {"like": source}
    return {"affine": affine}


def write_mask(labels: np.ndarray, source: Path, out_file: Path, affine: np.ndarray | None = None) -> Path:
    """Write ``labels`` (source voxel grid) as a uint8 NIfTI label map with the source's affine,
    qform/sform and their codes, atomically (see ``pipeline.fileio``)."""
    return write_nifti(np.asarray(labels, dtype=np.uint8), out_file, labels=True, **_geometry(source, affine))


def write_probabilities(probs: np.ndarray, source: Path, out_file: Path, dtype: str = "float32",
                        affine: np.ndarray | None = None) -> Path:
    """Write (K, *spatial) probabilities as a NIfTI with the channels in the last dimension."""
    return write_nifti(np.moveaxis(np.asarray(probs, dtype=dtype), 0, -1), out_file, **_geometry(source, affine))


# ---------------------------------------------------------------- report.csv


def read_report(out_dir: Path) -> dict[str, dict[str, str]]:
    f = Path(out_dir) / REPORT
    if not f.is_file():
        return {}
    with open(f, newline="") as fh:
        return {r["study_id"]: r for r in csv.DictReader(fh) if r.get("study_id")}


def write_report(out_dir: Path, rows: Sequence[dict[str, Any]], label_names: Sequence[str]) -> Path:
    """Merge ``rows`` into ``report.csv`` by study_id (rows of other shards and earlier runs are
    kept) and rewrite it atomically, under a lock shared by concurrent shards."""
    out_dir = Path(out_dir)
    with locked(out_dir / ".report.lock"):
        merged = read_report(out_dir)
        for r in rows:
            merged[r["study_id"]] = {k: _cell(v) for k, v in r.items()}
        size = "mm2" if any(k.startswith("mm2_") and v != "" for r in merged.values() for k, v in r.items()) else "ml"
        volume_cols = [f"{p}_{n}" for n in list(label_names)[1:] for p in ("voxels", size)]  # mm2: 2D images
        extra = sorted({k for r in merged.values() for k in r} - set(BASE_COLUMNS) - set(volume_cols))
        columns = BASE_COLUMNS + volume_cols + extra
        with atomic_path(out_dir / REPORT) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=columns, restval="")
            w.writeheader()
            for sid in sorted(merged):
                w.writerow(merged[sid])
    return out_dir / REPORT


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return "" if v is None else v
