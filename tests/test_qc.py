"""Validation QC of a case whose label is all background (a study without the structures)."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

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
