"""The shared part of the real-data regression tests of shipped models: ``segpipe predict`` (a
subprocess, the product path) on shared cases, each mask checked against its image's geometry and
scored per class against the true label."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.evaluation import case_metrics

ROOT = Path(__file__).resolve().parents[1]


def predict_and_score(bundle: Path, data: Path, cases: list[str], classes: list[str], tmp_path: Path,
                      timeout: int = 600) -> dict[str, list[float]]:
    """Dice per class (``classes``: the foreground names in label order) for each of ``cases``
    (``data/imagesTr/<case>.nii.gz`` against ``data/labelsTr``), predicted by the bundle as shipped;
    the masks must have their image's shape and affine."""
    studies = tmp_path / "studies"
    studies.mkdir()
    for case in cases:
        (studies / f"{case}.nii.gz").symlink_to(data / "imagesTr" / f"{case}.nii.gz")
    out = tmp_path / "masks"
    cmd = [sys.executable, "-m", "pipeline", "predict", str(bundle), "--input", str(studies), "--output", str(out),
           "--device", "cpu", "--no-progress"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    dice: dict[str, list[float]] = {name: [] for name in classes}
    for case in cases:
        ref_img = nib.load(data / "labelsTr" / f"{case}.nii.gz")
        pred_img = nib.load(out / f"{case}.nii.gz")
        assert pred_img.shape == ref_img.shape and np.allclose(pred_img.affine, ref_img.affine), case
        metrics = case_metrics(np.asarray(pred_img.dataobj).astype(np.int64),
                               np.asarray(ref_img.dataobj).astype(np.int64),
                               ref_img.header.get_zooms()[:3], ["background", *classes])
        for name in classes:
            dice[name].append(metrics[name]["dice"])
    return dice
