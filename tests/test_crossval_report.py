"""benchmarks/crossval_report.py: the paired comparison of two cross-validations of one split."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "crossval_report.py"


def _load():
    spec = importlib.util.spec_from_file_location("crossval_report", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cv(dice: dict[str, tuple[int, float, float]], raw_shift: float = 0.0) -> dict:
    """A crossval.json with case -> (fold, dice of class a, dice of class b); chosen post-processing
    is the given Dice, raw is shifted by ``raw_shift``."""
    def case(f: int, x: float, y: float, shift: float) -> dict:
        return {"fold": f, "dice": {"a": x + shift, "b": y + shift}, "hd95_mm": {"a": 1.0, "b": 1.0}}
    return {"cases": {i: case(*v, raw_shift) for i, v in dice.items()},
            "postprocessing": {"chosen": "largest_per_class", "cases": {i: case(*v, 0.0) for i, v in dice.items()}}}


def test_paired_table_uses_the_chosen_post_processing_and_common_cases():
    mod = _load()
    old = _cv({"c1": (0, 0.70, 0.80), "c2": (0, 0.60, 0.60), "c3": (1, 0.50, 0.50), "c4": (1, 0.9, 0.9)}, raw_shift=-0.5)
    new = _cv({"c1": (0, 0.80, 0.80), "c2": (0, 0.60, 0.50), "c3": (1, 0.60, 0.60)}, raw_shift=-0.5)
    lines = mod.paired_table(new, old)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    # fold 0: c1 +0.05, c2 -0.05 -> mean 0, one better; fold 1: c3 +0.10 (c4 is only in old)
    assert rows["0"][0] == "2" and rows["0"][3].startswith("+0.0000") and rows["0"][4] == "1 / 2"
    assert rows["1"][0] == "1" and rows["1"][3].startswith("+0.1000") and rows["1"][4] == "1 / 1"
    assert rows["**all**"][0] == "3" and rows["**all**"][1:3] == ["0.6167", "0.6500"] and rows["**all**"][4] == "2 / 3"


def test_paired_table_refuses_another_split(tmp_path: Path):
    old = _cv({"c1": (0, 0.7, 0.8), "c2": (1, 0.6, 0.6)})
    new = _cv({"c1": (1, 0.7, 0.8), "c2": (0, 0.6, 0.6)})
    with pytest.raises(SystemExit, match="c1 is in different folds"):
        _load().paired_table(new, old)
    # and from the command line: one line, non-zero exit
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for f, cv in ((a, new), (b, old)):
        cv.update({"bundle": "x", "folds": 2, "cases_scored": 2, "cases_total": 2,
                   "summary": {"n": 2, "mean_dice": 0.7, "dice": {"a": {"mean": 0.7, "sd": 0.0}, "b": {"mean": 0.7, "sd": 0.0}},
                               "hd95_mm": {"a": {"mean": 1.0, "sd": 0.0}, "b": {"mean": 1.0, "sd": 0.0}}},
                   "per_fold": {}})
        cv["postprocessing"]["mean_dice"] = {"none": 0.7}
        f.write_text(json.dumps(cv))
    r = subprocess.run([sys.executable, str(SCRIPT), str(a), "--against", str(b)], capture_output=True, text=True)
    assert r.returncode != 0 and "different folds" in r.stderr
