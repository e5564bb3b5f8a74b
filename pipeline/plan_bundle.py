"""``segpipe plan``: a manifest -> a complete MONAI bundle, with nothing to edit by hand.

``plan_bundle(manifest, out)`` validates the manifest (every problem refused, the first one named),
fingerprints it (:mod:`pipeline.fingerprint`), turns the fingerprint into decisions
(:func:`pipeline.plan.make_plan`) and writes them as a bundle in the conventions of the shipped
ones (``bundles/hippocampus_mri_3d``: DynUNet, the boundary-weighted loss, the overlap-tile
predictor, every id ``segpipe train``/``predict`` read declared)::

    out/configs/metadata.json   labels and channels from the manifest, the input/output contract,
                                version, changelog, the fingerprint's sha256, the labels' DICOM SEG
                                codes (pipeline.segment_codes; a warning names labels without one)
    out/configs/common.json     shared ids: paths, network, deterministic transforms, inferer
    out/configs/train.json, inference.json, evaluate.json, logging.conf
    out/docs/README.md          every decision with the fingerprint figure it came from
    out/LICENSE, out/models/    (weights land in models/model.pt when training ends: export)
    out/plan.json, out/fingerprint.json, out/splits.json

Everything is written into a hidden folder beside ``out`` (``.<name>.plan-<pid>.<host>``, pid and
host as in :mod:`pipeline.fileio`'s temp names) and renamed onto it at the end, so an error leaves
no partial bundle; a killed plan's folder is removed by the next plan into the same parent folder
(:func:`clean_stale_plans`: this machine's, of processes that no longer run). An existing non-empty
``out`` is refused (never overwritten).
Paths in the configs are relative to ``bundle_root``: ``dataset_dir`` points from the bundle to
the manifest's folder, and the training split is the bundle's own ``splits.json`` (the one beside
the manifest when it matches, else the same patient-grouped split computed afresh).

The configs themselves: :mod:`pipeline.plan_configs` (pure functions of the plan).
README, metadata and licence texts: :mod:`pipeline.plan_docs`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, UsageError
from pipeline.evaluation import json_safe
from pipeline.fileio import HOST, pid_alive, remove_made_folders

log = logging.getLogger(__name__)

#: a plan's temp folder: ``.<name>.plan-<pid>.<host>`` (no host in names from before hosts)
_PLAN_TMP = re.compile(r"^\..+\.plan-(\d{1,9})(?:\.([0-9a-f]{8}))?$")


def temp_dir(out: Path) -> Path:
    """The hidden folder beside ``out`` this process writes the bundle into."""
    return out.parent / f".{out.name}.plan-{os.getpid()}.{HOST}"


def clean_stale_plans(folder: Path) -> list[Path]:
    """Remove the temp folders that killed plans left in ``folder``: this machine's (or without a
    host) whose process no longer runs. A live process's folder, and another machine's (its pid
    means nothing here), are left alone. Returns the folders removed."""
    removed = []
    for d in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = _PLAN_TMP.match(d.name)
        if not m or m.group(2) not in (None, HOST) or pid_alive(int(m.group(1))):
            continue
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    if removed:
        log.info("removed %s: left by a plan that was killed", ", ".join(str(d) for d in removed))
    return removed


def dumps(obj: Any, indent: int = 0, width: int = 100) -> str:
    """JSON as the shipped configs are written: a value on one line when it fits in ``width``
    characters, else one entry per line (readable configs, not one number per line)."""
    inline = json.dumps(obj)
    if not isinstance(obj, (dict, list)) or not obj or len(inline) + indent <= width:
        return inline
    pad = " " * (indent + 2)
    if isinstance(obj, dict):
        items = [f"{pad}{json.dumps(k)}: {dumps(v, indent + 2, width - len(json.dumps(k)) - 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    return "[\n" + ",\n".join(f"{pad}{dumps(v, indent + 2, width)}" for v in obj) + "\n" + " " * indent + "]"


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(dumps(json_safe(obj)) + "\n")


def plan_bundle(manifest: Path, out: Path, name: str | None = None, device: str | None = None,
                budget_min: float = 30.0) -> dict[str, Any]:
    """Validate, fingerprint and plan ``manifest``; write the bundle to ``out`` (all or nothing).
    ``device`` None: cuda when this machine has a GPU, else cpu. Returns the plan."""
    from pipeline.fingerprint import write_fingerprint
    from pipeline.laterality import label_pairs
    from pipeline.manifest import load_manifest
    from pipeline.plan import NUM_FOLDS, check_arguments, label_names, make_plan, write_plan
    from pipeline.plan_configs import bundle_configs
    from pipeline.plan_docs import LICENSE_TEXT, LOGGING_CONF, metadata, readme
    from pipeline.segment_codes import dicom_seg_block, uncoded_warning
    from pipeline.splits import saved_or_computed_splits
    from pipeline.validation import require_valid

    manifest, out = Path(manifest), Path(os.path.abspath(out))  # abspath: "--out ." has a name, a parent
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out}: exists and is not empty; plan into a new folder (a bundle is never overwritten)")
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_arguments(device, budget_min)  # before reading a single image
    data = load_manifest(manifest)
    try:
        labels = label_names(data.get("labels"))
    except InputError as e:
        raise InputError(f"{manifest}: {e}") from None
    if data.get("lateral_pairs") is not None and list(data["labels"]) == [str(i) for i in range(len(labels))]:
        label_pairs(labels, data, str(manifest))  # a bad declaration: its own line, before reading any image
    require_valid(manifest)  # the first problem in the error line, the others logged: each said once
    if len(data["training"]) < NUM_FOLDS:
        raise InputError(f"{manifest}: training: {len(data['training'])} cases, fewer than the {NUM_FOLDS} "
                         f"cross-validation folds (at least {NUM_FOLDS} labelled cases are needed)")
    clean_stale_plans(out.parent)
    tmp = temp_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)  # a dead process's, whose pid this one has
    created = [d for d in (out.parent, *out.parent.parents) if not d.exists()]  # deepest first: gone on failure
    moved: list[Path] = []
    try:
        for sub in ("configs", "docs", "models"):
            (tmp / sub).mkdir(parents=True)
        fp_path = write_fingerprint(manifest, tmp / "fingerprint.json", validate=False,  # validated above;
                                     say=False)  # its temporary path and raw suggestion would mislead
        digest = hashlib.sha256(fp_path.read_bytes()).hexdigest()
        fingerprint = json.loads(fp_path.read_text())
        compiler = any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)
        plan = {**make_plan(fingerprint, data, device, budget_min, name, compiler), "fingerprint_sha256": digest}
        uncoded = uncoded_warning(dicom_seg_block(plan["labels"])[1])  # segments a DICOM SEG calls "Tissue"
        if uncoded:
            log.warning("%s", uncoded)
            plan["warnings"].append(uncoded)
        write_plan(plan, tmp / "plan.json")
        _write_json(tmp / "splits.json", saved_or_computed_splits(manifest, plan["schedule"]["num_folds"], 0))
        # both sides resolved: the system follows a symlink in --out before a "..", so the path from the
        # bundle's real folder is the one that reaches the data (bundle_root is resolved, pipeline.bundle)
        dataset_dir = Path(os.path.relpath(manifest.resolve().parent, out.resolve())).as_posix()
        for f, config in bundle_configs(plan, dataset_dir, manifest.name).items():
            _write_json(tmp / "configs" / f, config)
        _write_json(tmp / "configs" / "metadata.json", metadata(plan, data))
        (tmp / "configs" / "logging.conf").write_text(LOGGING_CONF)
        (tmp / "docs" / "README.md").write_text(readme(plan, data, fingerprint, dataset_dir, out.name))
        (tmp / "LICENSE").write_text(LICENSE_TEXT.format(name=plan["name"], data=data.get("name", manifest.name),
                                                         licence=data.get("licence", "not stated in the manifest")))
        if out.exists():  # an empty folder given as --out (perhaps the current one): filled, not replaced
            for child in tmp.iterdir():
                moved.append(out / child.name)
                os.replace(child, out / child.name)
            tmp.rmdir()
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for m in moved:  # an empty --out is left empty again
            shutil.rmtree(m, ignore_errors=True) if m.is_dir() else m.unlink(missing_ok=True)
        remove_made_folders(created)
        raise
    log.info("planned bundle %s in %s", plan["name"], out)
    return plan
