"""Batch prediction end to end through `python -m pipeline predict`: broken studies, resume,
SIGKILL mid-batch, shards, unwritable output, missing weights, reruns with another model."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.bundle import get, load_bundle
from pipeline.errors import InputError, UsageError
from pipeline.predict import predict
from pipeline.predict_io import parse_shard
from pipeline.synthetic import write_dataset

ROOT = Path(__file__).resolve().parents[1]
SMALL = (24, 24, 8)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantom_ct_3d bundle's configs with random weights of its network_def."""
    b = tmp_path_factory.mktemp("bundle")
    shutil.copytree(ROOT / "bundles" / "phantom_ct_3d" / "configs", b / "configs")
    cfg = json.loads((b / "configs" / "inference.json").read_text())
    (b / "configs" / "inference.json").write_text(json.dumps({**cfg, "compile": False}))  # tiny volumes
    (b / "models").mkdir()
    torch.manual_seed(0)
    net = get(load_bundle(b, ("common.json", "inference.json")), "network_def")
    torch.save(net.state_dict(), b / "models" / "model.pt")
    return b


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 6 small phantom CT images (LPS affine)."""
    root = tmp_path_factory.mktemp("ct")
    write_dataset("ct3d", 6, root, seed=0, shape=SMALL)
    return root / "imagesTr"


def other_weights(bundle: Path, path: Path, label: int = 2) -> Path:
    """The bundle's weights with the output bias of ``label`` raised so far that every voxel is it:
    masks that surely differ from the random weights' ones."""
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    key = [k for k, v in state.items() if k.endswith("bias") and v.shape == (4,)][-1]  # the output conv
    state[key] = state[key].clone()
    state[key][label] += 1e4
    torch.save(state, path)
    return path


def _masks(out: Path) -> dict[str, bytes]:
    return {f.name: np.asarray(nib.load(str(f)).dataobj).tobytes() for f in sorted(out.glob("ct_*.nii.gz"))}


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("pipeline") and r.levelname == "WARNING"]


def _run(bundle: Path, inp: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``segpipe predict`` as a job runs it: stderr to a pipe, no terminal, so no progress bar."""
    return subprocess.run([sys.executable, "-m", "pipeline", "predict", str(bundle), "--input", str(inp),
                           "--output", str(out), *extra],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def _report(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "report.csv", newline="") as f:
        return {r["study_id"]: r for r in csv.DictReader(f)}


def _broken(folder: Path, good: Path) -> dict[str, str]:
    """Write broken studies beside good ones; return id -> a word the error must contain."""
    (folder / "empty.nii.gz").write_bytes(b"")
    (folder / "text.nii.gz").write_text("this is not an image\n")
    raw = good.read_bytes()
    (folder / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.int16), np.diag([-1.0, -1, 1, 1])), str(folder / "flat2d.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((*SMALL, 2), np.int16), np.diag([-1.0, -1, 1, 1])),
             str(folder / "twochan.nii.gz"))
    hdr = bytearray(gzip.decompress(raw))
    struct.pack_into("<f", hdr, 76 + 4 * 2, float("nan"))  # pixdim[2] = NaN in the raw header
    (folder / "nanspacing.nii.gz").write_bytes(gzip.compress(bytes(hdr)))
    return {"empty": "empty", "text": "gzip", "truncated": "truncat", "flat2d": "2D",
            "twochan": "channels", "nanspacing": "spacing"}


def test_broken_studies_fail_alone_and_exit_1(bundle: Path, studies: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    inp = tmp_path / "in"
    shutil.copytree(studies, inp)
    good = sorted(p.name.removesuffix(".nii.gz") for p in inp.glob("*.nii.gz"))
    bad = _broken(inp, inp / f"{good[0]}.nii.gz")
    (inp / "notes").mkdir()  # a folder of other files is no study, and no noise: GDCM's raw lines are kept quiet
    (inp / "notes" / "readme.txt").write_text("scanned 2026-12-01\n")
    out = tmp_path / "out"
    r = _run(bundle, inp, out)
    assert r.returncode == 1, r.stderr
    assert "GDCMSeriesFileNames" not in r.stderr and "notes" not in _report(out), r.stderr
    assert "\r" not in r.stderr and "study/s" not in r.stderr  # no terminal: log lines, no bar redrawn into them
    rows = _report(out)
    assert set(rows) == set(good) | set(bad)
    for sid in good:
        assert rows[sid]["status"] == "ok", rows[sid]
        src, mask = nib.load(str(inp / f"{sid}.nii.gz")), nib.load(str(out / f"{sid}.nii.gz"))
        assert mask.shape == src.shape and np.allclose(mask.affine, src.affine)
        assert int(rows[sid]["voxels_liver"]) == int((np.asarray(mask.dataobj) == 1).sum())
    for sid, word in bad.items():
        assert rows[sid]["status"] == "failed" and word.lower() in rows[sid]["error"].lower(), rows[sid]
        assert "\n" not in rows[sid]["error"] and not (out / f"{sid}.nii.gz").exists()
    assert f"{len(good)} ok, 0 skipped, {len(bad)} failed" in r.stdout

    monkeypatch.chdir(tmp_path)  # the rerun names the folder relatively: its rows still name files absolutely
    again = predict(bundle, inp, Path("out"), progress=False)  # rerun: completed studies are skipped, rows kept
    assert sorted(r["status"] for r in again) == sorted(["skipped"] * len(good) + ["failed"] * len(bad))
    rows2 = _report(out)
    assert {rows2[s]["status"] for s in good} == {"skipped"}
    assert all(rows2[s]["output"] == rows[s]["output"] == str(out / f"{s}.nii.gz") for s in good)
    assert all(rows2[s]["voxels_liver"] == rows[s]["voxels_liver"] for s in good)
    (out / "report.csv").unlink()  # a rerun rebuilds it: the skipped studies' volumes counted from their masks
    predict(bundle, inp, out, progress=False)
    rows3 = _report(out)
    assert all(rows3[s]["status"] == "skipped" for s in good)
    assert all(rows3[s][c] == rows[s][c] for s in good for c in ("voxels_liver", "ml_liver", "voxels_spleen"))


def test_sigkill_mid_batch_then_rerun_completes(bundle: Path, tmp_path: Path) -> None:
    write_dataset("ct3d", 10, tmp_path / "ds", seed=1, shape=SMALL)
    inp, out = tmp_path / "ds" / "imagesTr", tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline", "predict", str(bundle), "--input", str(inp), "--output", str(out),
           "--no-progress"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while not list(out.glob("ct_*.nii.gz")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = sorted(out.glob("ct_*.nii.gz"))
    assert 1 <= len(done) < 10, "the run should have been killed mid-batch"
    for f in done:  # every final name is a complete mask
        assert np.asarray(nib.load(str(f)).dataobj).shape == SMALL
    assert not any(r["status"] == "failed" for r in predict(bundle, inp, out, progress=False))
    rows = _report(out)
    assert len(rows) == 10 and {x["status"] for x in rows.values()} <= {"ok", "skipped"}
    assert sum(x["status"] == "skipped" for x in rows.values()) >= len(done)
    for f in out.glob("ct_*.nii.gz"):
        assert np.asarray(nib.load(str(f)).dataobj).shape == SMALL
    assert not [f for f in out.iterdir() if f.name.startswith(".tmp-")]


def test_shards_are_disjoint_and_complete(bundle: Path, studies: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    ids = [{r["study_id"] for r in predict(bundle, studies, out, shard=f"{i}/3", progress=False)} for i in range(3)]
    assert set.union(*ids) == {p.name.removesuffix(".nii.gz") for p in studies.glob("*.nii.gz")}
    assert sum(map(len, ids)) == len(set.union(*ids))
    assert len(_report(out)) == 6  # shards writing one folder keep each other's rows
    stamp = json.loads((out / ".segpipe_model.json").read_text())  # one model, recorded once by three shards
    [model] = stamp["models"]
    assert {r["model"] for r in _report(out).values()} == {model}
    assert all(r["status"] == "skipped" for i in range(3)
               for r in predict(bundle, studies, out, shard=f"{i}/3", progress=False))
    other = {"model_path": str(other_weights(bundle, tmp_path / "other.pt"))}  # one shard with other weights
    again = predict(bundle, studies, out, shard="1/3", overrides=other, progress=False)
    assert {r["status"] for r in again} == {"ok"} and len(again) == 2
    rows = _report(out)  # the other shards' rows and masks stay theirs, and a rerun of them still skips
    assert {rows[r["study_id"]]["model"] for r in again} == {r["model"] for r in again} != {model}
    assert sum(r["model"] == model for r in rows.values()) == 4
    assert {r["status"] for r in predict(bundle, studies, out, shard="0/3", progress=False)} == {"skipped"}
    assert len(json.loads((out / ".segpipe_model.json").read_text())["models"]) == 2
    for bad in ("3/3", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(UsageError):
            parse_shard(bad)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parse_shard(None) == (1, 4) and parse_shard("0/2") == (0, 2)


def test_unwritable_output_fails_before_work(bundle: Path, studies: Path, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        target = tmp_path / "file"  # root writes anywhere: use a path below a plain file instead
        target.write_text("")
        out = target / "out"
    else:
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o500)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="not writable"):
        predict(bundle, studies, out, progress=False)
    assert time.perf_counter() - t0 < 1  # before loading the model or reading any study


def test_bundle_without_weights_is_a_clear_error(bundle: Path, studies: Path, tmp_path: Path) -> None:
    b = tmp_path / "noweights"
    shutil.copytree(bundle / "configs", b / "configs")
    with pytest.raises(InputError, match="no weights"):
        predict(b, studies, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_a_run_that_fails_before_any_study_leaves_nothing_it_made(bundle: Path, studies: Path,
                                                                   tmp_path: Path) -> None:
    """A bad bundle, no studies or a bad --set stops the run before any study is written: the
    output folder it made (with its missing parents) goes; a folder that existed, and whatever
    anyone put there, stays."""
    noweights = tmp_path / "noweights"
    shutil.copytree(bundle / "configs", noweights / "configs")
    new = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(InputError, match="no weights"):
        predict(noweights, studies, new, progress=False)
    assert not (tmp_path / "new").exists()
    with pytest.raises(UsageError, match="no such file"):  # a mistyped --input: exit 2
        predict(bundle, tmp_path / "nowhere", new, progress=False)
    assert not (tmp_path / "new").exists()

    kept = tmp_path / "kept"  # an existing parent stays, the folder made below it goes
    (kept / "mine").mkdir(parents=True)
    (kept / "mine" / "notes.txt").write_text("the user's\n")
    with pytest.raises(InputError, match="no weights"):
        predict(noweights, studies, kept / "mine" / "out", progress=False)
    assert sorted(p.name for p in (kept / "mine").iterdir()) == ["notes.txt"]
    with pytest.raises(InputError, match="no weights"):
        predict(noweights, studies, kept / "mine", progress=False)
    assert (kept / "mine" / "notes.txt").read_text() == "the user's\n"
    (kept / "empty").mkdir()
    with pytest.raises(InputError, match="no weights"):
        predict(noweights, studies, kept / "empty", progress=False)
    assert (kept / "empty").is_dir()

    r = _run(bundle, studies, tmp_path / "cli" / "out", "--set", "predictor=$no_such_name")  # a bad --set
    assert r.returncode != 0 and not (tmp_path / "cli").exists(), r.stderr


def test_dicom_series_good_mixed_and_empty(bundle: Path, tmp_path: Path) -> None:
    from test_studies import volume, write_series  # the DICOM writer of the studies tests

    from pipeline.dicom_series import dicom_series_to_nifti

    inp = tmp_path / "in"
    write_series(inp / "good", volume())
    write_series(inp / "mixed", volume(), uid="1.2.3.4.1")
    for f in write_series(tmp_path / "other", volume(), uid="1.2.3.4.2").iterdir():
        shutil.copy(f, inp / "mixed" / f"b_{f.name}")
    shutil.copytree(inp / "good", inp / "gappy")
    (inp / "gappy" / "slice_002.dcm").unlink()
    rows = {r["study_id"]: r for r in predict(bundle, inp, tmp_path / "out", progress=False)}
    assert rows["good"]["status"] == "ok", rows["good"]
    assert rows["mixed"]["status"] == "failed" and "series" in rows["mixed"]["error"]
    assert rows["gappy"]["status"] == "failed" and "incomplete" in rows["gappy"]["error"]
    ref = nib.load(str(dicom_series_to_nifti(inp / "good", tmp_path / "ref.nii.gz")))
    mask = nib.load(str(tmp_path / "out" / "good.nii.gz"))
    assert mask.shape == ref.shape and np.allclose(mask.affine, ref.affine, atol=1e-4)
    (tmp_path / "notdicom").mkdir()
    (tmp_path / "notdicom" / "slice_000.dcm").write_bytes(b"not DICOM")
    [row] = predict(bundle, tmp_path / "notdicom", tmp_path / "out2", progress=False)
    assert row["status"] == "failed" and "no DICOM series" in row["error"]
    (tmp_path / "empty").mkdir()  # nothing in it: no studies, and no output folder left behind
    with pytest.raises(InputError, match=r"empty: no studies \(NIfTI files or DICOM series\) found"):
        predict(bundle, tmp_path / "empty", tmp_path / "out3", progress=False)
    (tmp_path / "notes").mkdir()  # files that are no image, nor meant as DICOM: as empty (it failed as a study)
    (tmp_path / "notes" / "notes.txt").write_text("scanned 2026-12-01\n")
    with pytest.raises(InputError, match=r"notes: no studies \(NIfTI files or DICOM series\) found"):
        predict(bundle, tmp_path / "notes", tmp_path / "out4", progress=False)
    assert not (tmp_path / "out4").exists()
    assert not (tmp_path / "out3").exists()


def test_an_output_folder_inside_the_input_is_not_read_as_studies(bundle: Path, tmp_path: Path) -> None:
    """``--output`` inside ``--input``: a rerun must not segment the first run's masks (<id>.nii.gz)."""
    from pipeline.predict_io import list_studies

    write_dataset("ct3d", 2, tmp_path / "in", seed=0, shape=(16, 16, 4))
    studies = tmp_path / "in" / "imagesTr"
    (studies / "masks").mkdir()
    for f in studies.glob("*.nii.gz"):
        shutil.copy(f, studies / "masks" / f.name)  # as a first run leaves its masks there
    ids = sorted(f.name.removesuffix(".nii.gz") for f in studies.glob("*.nii.gz"))
    assert [s["id"] for s in list_studies(studies)] == sorted([*ids, *(f"masks_{i}" for i in ids)])
    assert [s["id"] for s in list_studies(studies, exclude=studies / "masks")] == ids
    rows = predict(bundle, studies, studies / "masks", overrides={"max_voxels": 1000}, progress=False)
    assert sorted(r["study_id"] for r in rows) == ids
    # a run's output that a later run does not write into: its stamp says what it is, no studies either
    assert {r["status"] for r in predict(bundle, studies, studies / "run2", progress=False)} == {"ok"}
    assert [s["id"] for s in list_studies(studies, exclude=studies / "masks")] == ids


def test_manifest_input_and_voxel_limit_refused_before_reading(bundle: Path, studies: Path, tmp_path: Path) -> None:
    manifest = studies.parent / "dataset.json"  # no "test" entries: its training images are used
    rows = predict(bundle, manifest, tmp_path / "out", overrides={"max_voxels": 1000}, progress=False)
    assert sorted(r["study_id"] for r in rows) == sorted(p.name.removesuffix(".nii.gz") for p in studies.glob("*.nii.gz"))
    assert all(r["status"] == "failed" and "refusing to allocate" in r["error"] for r in rows)
    # the dataset's folder is its manifest: its label maps (labelsTr) are not studies
    folder = predict(bundle, studies.parent, tmp_path / "out2", overrides={"max_voxels": 1000}, progress=False)
    assert sorted(r["study_id"] for r in folder) == sorted(r["study_id"] for r in rows)


def test_stale_temps_of_this_machine_go_another_machines_stay_a_day(tmp_path: Path) -> None:
    """Shards on several machines may share one output folder: a pid says nothing about another
    machine's process, so its temp files are left alone until a day old (before, a shard starting
    on one machine deleted the files another machine was writing)."""
    import os

    from pipeline.fileio import HOST, atomic_path, temp_prefix
    from pipeline.predict_io import STALE_ELSEWHERE_S, clean_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    other = "0" * 8 if HOST != "0" * 8 else "1" * 8
    names = {"mine_dead": f".tmp-{dead}.{HOST}-a.nii.gz", "mine_live": f"{temp_prefix()}b.nii.gz",
             "legacy_dead": f".tmp-{dead}-c.nii.gz", "other_fresh": f".tmp-{dead}.{other}-d.nii.gz",
             "other_old": f".tmp-{dead}.{other}-e.nii.gz", "study": "f.nii.gz"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    old = time.time() - STALE_ELSEWHERE_S - 60
    os.utime(tmp_path / names["other_old"], (old, old))
    assert clean_stale_temps(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[k] for k in ("mine_live", "other_fresh", "study"))
    with atomic_path(tmp_path / "g.nii.gz") as tmp:  # the names atomic_path writes are this process's
        assert tmp.name.startswith(temp_prefix()) and f".{HOST}-" in tmp.name
        tmp.write_bytes(b"y")
        assert clean_stale_temps(tmp_path) == 0


def test_a_rerun_with_other_weights_predicts_again_with_the_same_skips(bundle: Path, studies: Path, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Masks of another model are not kept as if they were this one's: the weights' sha256 is
    recorded (``.segpipe_model.json``, each row's ``model``) and a rerun with other weights
    predicts every study again, saying so once; the same weights skip as before."""
    out = tmp_path / "out"
    first = predict(bundle, studies, out, progress=False)
    assert {r["status"] for r in first} == {"ok"}
    stamp = json.loads((out / ".segpipe_model.json").read_text())
    [model] = stamp["models"]
    assert stamp["models"][model]["weights"][0]["sha256"] == hashlib.sha256(
        (bundle / "models" / "model.pt").read_bytes()).hexdigest()
    assert stamp["models"][model]["bundle"] == {"name": "phantom_ct_3d",
                                                "version": json.loads((bundle / "configs" / "metadata.json")
                                                                      .read_text())["version"]}
    rows1, masks1 = _report(out), _masks(out)
    assert {r["model"] for r in rows1.values()} == {model}

    caplog.clear()
    same = predict(bundle, studies, out, overrides={"model_path": str(bundle / "models" / "model.pt")},
                   progress=False)  # the same file named otherwise: the same model
    assert {r["status"] for r in same} == {"skipped"} and {r["model"] for r in same} == {model}
    assert not _warnings(caplog)

    caplog.clear()
    other = other_weights(bundle, tmp_path / "other.pt")
    again = predict(bundle, studies, out, overrides={"model_path": str(other)}, progress=False,
                    preview=True)  # asking for previews too: still said (it was not, the previews being missing)
    assert {r["status"] for r in again} == {"ok"} and len(list(out.glob("*_preview.png"))) == 6
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "6 existing output(s)" in warnings[0] and "other weights" in warnings[0], warnings
    rows2, masks2 = _report(out), _masks(out)
    [new] = {r["model"] for r in rows2.values()}
    assert new != model and {r["status"] for r in rows2.values()} == {"ok"}
    assert all(masks2[k] != masks1[k] for k in masks1)
    assert all(int(r["voxels_kidney"]) == int(np.prod(SMALL)) for r in rows2.values())
    assert sorted(json.loads((out / ".segpipe_model.json").read_text())["models"]) == sorted([model, new])
    # back to the first weights: predicted again too (the rows say which model made each mask)
    back = predict(bundle, studies, out, progress=False)
    assert {r["status"] for r in back} == {"ok"} and _masks(out) == masks1
    # no previews asked this time: the other model's pictures go, and the page says what report.csv says
    assert not list(out.glob("*_preview.png")) and "_preview.png" not in (out / "index.html").read_text()


def test_a_rerun_with_a_mask_changing_setting_predicts_again_naming_it(bundle: Path, studies: Path,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "out"
    predict(bundle, studies, out, progress=False)
    r = _run(bundle, studies, out, "--set", "tta=true", "--set", "sw_batch_size=2")
    assert r.returncode == 0 and "6 ok, 0 skipped, 0 failed" in r.stdout, r.stderr
    said = [line for line in r.stderr.splitlines() if "predicted again" in line]
    assert len(said) == 1 and "6 existing output(s)" in said[0] and "other settings: tta" in said[0], r.stderr
    assert "other weights" not in said[0] and "sw_batch_size" not in said[0]
    # a setting that does not change masks (windows per batch, compilation, device) keeps them
    rows = predict(bundle, studies, out, overrides={"tta": True, "sw_batch_size": 1, "compile": False},
                   progress=False)
    assert {r["status"] for r in rows} == {"skipped"}
    assert {r["status"] for r in predict(bundle, studies, out, overrides={"postprocess": {
        "keep_largest": [1], "fill_holes": []}, "tta": True}, progress=False)} == {"ok"}


def test_outputs_of_no_recorded_model_are_kept_with_a_warning(bundle: Path, studies: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A folder an older segpipe wrote (masks, a report without ``model``, no stamp): its masks
    cannot be attributed, so they are kept as before, named once in a warning and marked
    ``unknown``; a mask without a row in a folder several models wrote is predicted again."""
    out = tmp_path / "out"
    predict(bundle, studies, out, progress=False)
    (out / ".segpipe_model.json").unlink()
    rows = _report(out)
    with open(out / "report.csv", "w", newline="") as f:  # as segpipe wrote it before models were recorded
        cols = [c for c in next(iter(rows.values())) if c != "model"]
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows.values())
    masks = _masks(out)
    caplog.clear()
    other = {"model_path": str(other_weights(bundle, tmp_path / "other.pt"))}
    kept = predict(bundle, studies, out, overrides=other, progress=False)
    assert {r["status"] for r in kept} == {"skipped"} and {r["model"] for r in kept} == {"unknown"}
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "6 existing output(s) are kept" in warnings[0], warnings
    assert _masks(out) == masks and {r["model"] for r in _report(out).values()} == {"unknown"}

    fresh = tmp_path / "fresh"  # two models wrote here; one mask lost its row (a kill between the two)
    predict(bundle, studies, fresh, shard="0/2", progress=False)
    predict(bundle, studies, fresh, shard="1/2", overrides=other, progress=False)
    rows = _report(fresh)
    lost = sorted(rows)[0]
    with open(fresh / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[lost]))
        w.writeheader()
        w.writerows(r for sid, r in rows.items() if sid != lost)
    caplog.clear()
    again = {r["study_id"]: r["status"] for r in predict(bundle, studies, fresh, progress=False)}
    assert again[lost] == "ok" and sorted(s for s, st in again.items() if st == "skipped") == sorted(rows)[2::2]
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "4 existing output(s)" in warnings[0], warnings  # 3 of the other model, the lost
    assert f"no report row says which model made them, and other models wrote into this folder ({lost})" in warnings[0]
    assert "other weights (" + ", ".join(sorted(rows)[1::2]) + ")" in warnings[0]


def test_a_2d_batch_reports_areas_in_mm2_not_volumes_in_ml(cells_dataset: Path, tmp_path: Path) -> None:
    """A 2D image has no volume: its label sizes are areas, in mm² (pixels times the pixel area),
    in report.csv, index.html and the preview's legend. Before, they were "mL": the pixel area
    times the header's nominal 1 mm thickness, divided by 1000."""
    from pipeline.preview import index_html, read_rows

    bundle = Path(__file__).resolve().parent.parent / "bundles" / "cells_2d"
    out = tmp_path / "out"
    rows = predict(bundle, cells_dataset.parent / "imagesTr", out, progress=False, preview=True)
    assert rows and all(r["status"] == "ok" for r in rows)
    for r in rows:
        mask = nib.load(r["output"])
        area = abs(np.linalg.det(mask.affine[:2, :2]))
        pixels = int((np.asarray(mask.dataobj) == 1).sum())
        assert r["voxels_cell"] == pixels and r["mm2_cell"] == pytest.approx(round(pixels * area, 3))
        assert "ml_cell" not in r
    with open(out / "report.csv", newline="") as f:
        header = next(csv.reader(f))
    assert "mm2_cell" in header and "ml_cell" not in header
    page = index_html(read_rows(out), ["background", "cell"], out, running=False)
    assert "cell (mm²)" in page and "(mL)" not in page


def test_save_probabilities_is_part_of_the_model_so_a_rerun_with_it_predicts_again() -> None:
    """--set save_probabilities=float32 makes the SEG fractional and adds probability files: a rerun
    into a folder of binary outputs skipped every study and wrote neither (E2E audit)."""
    from pipeline.predict_stamp import mask_settings

    bundle = Path(__file__).resolve().parent.parent / "bundles" / "phantom_ct_3d"
    plain = mask_settings(load_bundle(bundle, ("common.json", "inference.json")))
    fractional = mask_settings(load_bundle(bundle, ("common.json", "inference.json"), {"save_probabilities": "float32"}))
    assert plain["save_probabilities"] is False and fractional["save_probabilities"] == "float32"
