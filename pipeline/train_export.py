"""The export step of ``segpipe train``: a trained run's ``model.pt`` copied into its bundle's
``models/`` (with the docs' weights status), where the bundle's own configs would predict it at the
settings it was trained with."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.bundle import load_bundle, settings_not_in_bundle
from pipeline.fileio import atomic_path

log = logging.getLogger(__name__)


#: the ids trained weights are bound to, with every id they refer to: the network, the preprocessing
#: (spacing, intensities), the labels and the window (instance normalisation sees its statistics)
WEIGHT_ROOTS = ("network_def", "preprocessing", "label_names", "roi_size")


def exportable(bundle_dir: Path, overrides: dict[str, Any]) -> bool:
    """Whether the bundle's own inference would predict these weights at the settings they were
    trained with: not after a ``--set`` of the network, window or preprocessing that its configs
    do not hold (the bundle could not load them, or would misuse them). Says why not."""
    from pipeline.predict_stamp import referenced

    own = load_bundle(bundle_dir, ("common.json", "inference.json"))
    learnt = referenced(own, WEIGHT_ROOTS)  # what the weights mean; not TTA, windows' overlap, batch size, folds ...
    differ = settings_not_in_bundle(own, {k: v for k, v in overrides.items() if k.split("#")[0] in learnt})
    if differ:
        log.warning("this run's model.pt will not be exported into %s/models: trained with %s where its configs say "
                    "%s; predict with the same --set values and --set model_path=<the run's model.pt>, or write them "
                    "into the bundle's configs first", bundle_dir, " ".join(a for a, _ in differ),
                    ", ".join(b for _, b in differ))
    return not differ


def in_bundle(path: Path, bundle_dir: Path) -> str:
    """``path`` relative to the bundle where it lies inside it (``runs/model.pt``: still true when the
    bundle moves), else as it is."""
    try:
        return Path(path).resolve().relative_to(Path(bundle_dir).resolve()).as_posix()
    except ValueError:
        return str(path)


def export_model(model_path: Path, bundle_dir: Path, status: str | None = None) -> Path:
    """Copy trained weights into the bundle's ``models/model.pt`` (the explicit export step) and say
    so in the docs' weights status where they keep one (planned bundles): ``status``, or a line
    naming ``model_path`` and the date."""
    from pipeline.plan_docs import docs_with_status

    status = status or (f"**Status: trained.** `models/model.pt` is `{model_path}`, exported "
                        f"{time.strftime('%Y-%m-%d %H:%M')}.")
    docs = docs_with_status(bundle_dir, status)  # read before anything is written
    dest = Path(bundle_dir) / "models" / "model.pt"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:  # a kill mid-copy leaves the previous weights, not half a file
        shutil.copyfile(model_path, tmp)
    for path, text in docs.items():
        with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as f:
            f.write(text)
    log.info("exported %s -> %s", model_path, dest)
    return dest
