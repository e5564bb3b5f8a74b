"""Validation QC: a case whose label is all background (a study without the structures); each label's
colour, the same as in batch previews."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import numpy as np

from pipeline.qc import case_mean, write_case_csv


def test_a_case_without_reference_structures_has_a_nan_mean_and_no_warning(tmp_path: Path) -> None:
    nan = float("nan")
    report = {"names": ["liver", "kidney"], "cases": [("full", [0.5, 0.7]), ("partial", [nan, 0.4]),
                                                      ("empty", [nan, nan])]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "Mean of empty slice" was logged per validation
        path = write_case_csv(tmp_path / "val_cases.csv", report)
        assert math.isnan(case_mean([nan, nan]))
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["case", "dice_liver", "dice_kidney", "dice_mean"]
    assert [r[-1] for r in rows[1:]] == ["0.6000", "0.4000", "nan"]


def _has_colour(png: Path, rgb: tuple[float, float, float]) -> bool:
    """Whether some pixel of ``png`` is ``rgb`` (0..1), within one step of 255."""
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(int)
    return bool((np.abs(pixels - np.round(np.array(rgb) * 255)).max(axis=1) <= 1).any())


def test_a_label_has_one_colour_in_qc_pictures_previews_and_dicom_seg(tmp_path: Path) -> None:
    """QC pictures took label k's colour from tab10[k], the batch previews (and the DICOM SEG's
    display colours, taken from them) from tab10[k-1]: the liver orange in one, blue in the other."""
    import nibabel as nib
    import torch

    from pipeline.preview import label_colours, write_preview
    from pipeline.qc import qc_views, write_overlays

    names = ["background", "liver", "kidney"]
    labels = np.zeros((24, 24, 12), np.uint8)
    labels[3:12, 4:14, 2:9] = 1
    labels[14:21, 6:16, 3:10] = 2
    image = np.random.default_rng(0).normal(100, 10, labels.shape).astype(np.float32)
    onehot = torch.nn.functional.one_hot(torch.as_tensor(labels, dtype=torch.long), 3).permute(3, 0, 1, 2).float()
    views = qc_views(torch.as_tensor(image)[None], onehot, onehot)
    (qc_png,) = write_overlays(tmp_path / "qc", [("case", views)], names)
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "img.nii.gz")
    preview_png = write_preview(tmp_path / "img.nii.gz", labels, np.eye(4), names, {"liver": 1.0, "kidney": 1.0},
                                tmp_path / "preview.png")
    colours = label_colours(len(names))
    for k in (1, 2):
        assert _has_colour(qc_png, colours[k]), names[k]  # the legend's line and the contours
        assert _has_colour(preview_png, colours[k]), names[k]  # the legend's patch
    from matplotlib import colormaps

    assert not _has_colour(qc_png, colormaps["tab10"](2)[:3])  # green: the kidney's in QC pictures before
