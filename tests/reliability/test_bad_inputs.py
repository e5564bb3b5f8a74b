"""A bad-input corpus, built in tmp_path by the tests themselves, fed to `segpipe validate`,
`segpipe predict` and `segpipe train`.

Every broken kind gets one line naming the file and the problem (validate: a stdout line;
train: the `error:` line; predict: the study's report.csv `error`), exit code 1, no traceback
and no partial output. The valid-but-odd kinds (one voxel thick, smaller than the ROI, oblique,
LPS) validate clean and predict a mask in the source geometry (same shape and affine).

Cost: validate runs in-process for every kind (and once as a real process); predict runs once,
in one process, over a folder holding every image kind and two good studies; train and predict
on a manifest run in-process (the first call pays the imports), refused before any work starts.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bad_input_corpus import AS_ROOT, KINDS, build, nii, phantom

from pipeline.cli import main
from pipeline.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "phantom_ct_3d"  # ships weights
ROOT_SKIP = "running as root: chmod 000 does not stop root reading (test_unreadable_file_as_nobody covers it)"
INFO = re.compile(r"\d\d:\d\d:\d\d INFO ")  # a log line of the CLI, not a problem
BAD = [n for n, k in KINDS.items() if k.problem]
IMAGE_KINDS = [n for n, k in KINDS.items() if k.role == "image" and not (AS_ROOT and n == "unreadable")]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def no_traceback(*texts: str) -> bool:
    return not any("Traceback" in t for t in texts)


def test_the_corpus_has_at_least_25_kinds() -> None:
    assert len(KINDS) >= 25


# ---------------------------------------------------------------- validate: every kind, in-process


@pytest.mark.parametrize("name", KINDS)
def test_validate(name: str, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    """``segpipe validate`` through ``main`` in this process (``main`` returns the process's exit
    code; test_validate_process checks a real process once)."""
    if AS_ROOT and name == "unreadable":
        pytest.skip(ROOT_SKIP)
    manifest, bad = build(name, tmp_path / "ds")
    rc = main(["validate", str(manifest)])
    out, err = capsys.readouterr()
    assert no_traceback(out, err, caplog.text), err
    if not KINDS[name].problem:
        assert (rc, out.strip()) == (0, f"{manifest}: ok"), out + err
        return
    assert rc == 1, out + err
    [line] = out.splitlines()
    assert str(bad) in line and KINDS[name].problem in line, line
    assert [ln for ln in err.splitlines() if not INFO.match(ln)] == [f"{manifest}: 1 problem(s)"]


def test_validate_process(tmp_path: Path) -> None:
    manifest, bad = build("truncated_gz", tmp_path / "ds")
    r = run_cli("validate", str(manifest))
    assert r.returncode == 1 and no_traceback(r.stdout, r.stderr), r.stderr
    [line] = r.stdout.splitlines()
    assert str(bad) in line and KINDS["truncated_gz"].problem in line, line
    assert [ln for ln in r.stderr.splitlines() if not INFO.match(ln)] == [f"{manifest}: 1 problem(s)"]


# ---------------------------------------------------------------- train: refused before training starts


@pytest.fixture(scope="module")
def train_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle's configs alone: a run that got past validation would write runs/ here."""
    b = tmp_path_factory.mktemp("bundle")
    shutil.copytree(BUNDLE / "configs", b / "configs")
    return b


def _train(bundle: Path, manifest: Path, *extra: str) -> int:
    return main([*extra, "train", str(bundle), "--manifest", str(manifest), "--epochs", "1", "--device", "cpu"])


@pytest.mark.parametrize("name", BAD)
def test_train_refuses_before_training(name: str, tmp_path: Path, train_bundle: Path,
                                       capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    if AS_ROOT and name == "unreadable":
        pytest.skip(ROOT_SKIP)
    manifest, bad = build(name, tmp_path / "ds")
    rc = _train(train_bundle, manifest)
    out, err = capsys.readouterr()
    assert rc == 1, out + err
    [line] = [ln for ln in err.splitlines() if ln.startswith("segpipe train: error: ")]
    assert str(bad) in line and KINDS[name].problem in line, line
    assert no_traceback(out, err, caplog.text)
    assert not (train_bundle / "runs").exists()


def test_train_process_refuses_in_one_line_and_debug_shows_the_traceback(tmp_path: Path, train_bundle: Path) -> None:
    manifest, bad = build("label_all_background", tmp_path / "ds")
    r = run_cli("train", str(train_bundle), "--manifest", str(manifest), "--epochs", "1", "--device", "cpu")
    assert r.returncode == 1 and no_traceback(r.stdout, r.stderr), r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"segpipe train: error: {manifest}: failed validation")
    assert str(bad) in r.stderr.strip().splitlines()[-1]
    with pytest.raises(InputError, match="label is empty"):
        _train(train_bundle, manifest, "--debug")
    assert not (train_bundle / "runs").exists()


# ---------------------------------------------------------------- predict: one process over every image kind


@dataclass
class Predicted:
    run: subprocess.CompletedProcess
    sources: dict[str, Path]
    out: Path
    rows: dict[str, dict[str, str]]


@pytest.fixture(scope="module")
def predicted(tmp_path_factory: pytest.TempPathFactory) -> Predicted:
    root = tmp_path_factory.mktemp("predict")
    inp, out = root / "in", root / "out"
    inp.mkdir()
    sources = {name: KINDS[name].make(inp, name) for name in IMAGE_KINDS}
    sources |= {f"good_{i}": nii(inp / f"good_{i}.nii.gz", phantom(seed=i)) for i in range(2)}
    r = run_cli("predict", str(BUNDLE), "--input", str(inp), "--output", str(out), "--no-progress", "--device", "cpu")
    with open(out / "report.csv", newline="") as f:
        rows = {row["study_id"]: row for row in csv.DictReader(f)}
    return Predicted(r, sources, out, rows)


def test_predict_run_fails_only_the_bad_studies(predicted: Predicted) -> None:
    r, rows = predicted.run, predicted.rows
    assert r.returncode == 1 and no_traceback(r.stdout, r.stderr), r.stderr
    assert set(rows) == set(predicted.sources)
    failed = sorted(n for n in IMAGE_KINDS if KINDS[n].problem)
    assert sorted(s for s, row in rows.items() if row["status"] == "failed") == failed
    assert f"{len(rows) - len(failed)} ok, 0 skipped, {len(failed)} failed" in r.stdout
    assert sorted(f.name for f in predicted.out.iterdir()) == sorted(
        ["report.csv", ".report.lock", ".segpipe_model.json"]  # the stamp: which model made the masks
        + [f"{s}.nii.gz" for s, row in rows.items() if row["status"] == "ok"])


@pytest.mark.parametrize("name", IMAGE_KINDS)
def test_predict(name: str, predicted: Predicted) -> None:
    row, source, mask = predicted.rows[name], predicted.sources[name], predicted.out / f"{name}.nii.gz"
    expected = KINDS[name].predict or KINDS[name].problem
    if expected:
        assert row["status"] == "failed", row
        assert row["error"].startswith(f"{source}: ") and expected in row["error"], row["error"]
        assert not mask.exists()
        return
    assert row["status"] == "ok", row
    src, out = nib.load(source), nib.load(mask)
    assert out.shape == src.shape and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-5)


def test_lps_study_gets_the_ras_studys_mask_flipped(predicted: Predicted) -> None:
    lps = np.asarray(nib.load(predicted.out / "lps_affine.nii.gz").dataobj)
    ras = np.asarray(nib.load(predicted.out / "good_0.nii.gz").dataobj)
    np.testing.assert_array_equal(lps, ras[::-1, ::-1])


@pytest.mark.parametrize("name", [n for n, k in KINDS.items() if k.role == "manifest"])
def test_predict_refuses_a_bad_manifest_before_loading_the_model(name: str, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    manifest, bad = build(name, tmp_path / "ds")
    out = tmp_path / "out"
    rc = main(["predict", str(BUNDLE), "--input", str(manifest), "--output", str(out), "--no-progress",
               "--device", "cpu"])
    _, err = capsys.readouterr()
    assert rc == 1, err
    [line] = err.strip().splitlines()
    assert line.startswith(f"segpipe predict: error: {manifest}: ") and str(bad) in line, line
    assert KINDS[name].problem in line and not out.exists()  # the folder it made is removed, nothing written


# ---------------------------------------------------------------- a file without read permission, as root


@pytest.mark.skipif(not AS_ROOT, reason="the table's 'unreadable' kind covers it for other users")
def test_unreadable_file_as_nobody(capsys: pytest.CaptureFixture) -> None:
    """Root reads any file, so the commands run in-process with the effective uid of `nobody`,
    after one run as root has imported what they import lazily."""
    root = Path(tempfile.mkdtemp(prefix="segpipe-unreadable-"))
    try:
        manifest, bad = build("unreadable", root / "ds")
        for d in (root, *(p for p in root.rglob("*") if p.is_dir())):
            d.chmod(0o755)
        (root / "out").mkdir(mode=0o777)
        (root / "out").chmod(0o777)
        predict = ["predict", str(BUNDLE), "--input", str(bad), "--no-progress", "--device", "cpu", "--output"]
        assert main(["validate", str(manifest)]) == 0 and main([*predict, str(root / "warm")]) == 0
        capsys.readouterr()
        os.seteuid(65534)
        try:
            codes = main(["validate", str(manifest)]), main([*predict, str(root / "out")])
        finally:
            os.seteuid(0)
        out, err = capsys.readouterr()
        assert codes == (1, 1), out + err
        assert f"training[0] case: image {bad}: cannot read (Permission denied)" in out.splitlines()
        with open(root / "out" / "report.csv", newline="") as f:
            [row] = list(csv.DictReader(f))
        assert row["status"] == "failed" and row["error"] == f"{bad}: cannot read (Permission denied)"
        assert sorted(p.name for p in (root / "out").iterdir()) == [".report.lock", ".segpipe_model.json", "report.csv"]
        assert no_traceback(out, err)
    finally:
        shutil.rmtree(root)
