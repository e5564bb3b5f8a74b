"""Fault injection: SIGKILL a training run and a batch prediction at five moments each, fill the
output disk (a file-size limit), and train twice with one seed.

Every kill must leave only readable checkpoints / complete masks, every rerun must finish, and
the finished result must be the one a run without faults gives.
"""

from __future__ import annotations

import csv
import json
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_train import FAST as ENGINE_FAST  # tests/ is on sys.path, as for test_studies
from test_train import _sets

from pipeline.checkpoints import list_checkpoints
from pipeline.synthetic import write_dataset
from pipeline.train import train_bundle

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "phantom_ct_3d"
FAST = {**ENGINE_FAST, "val_interval": 1}  # 6 phantoms at 16x16x12: 2 iterations per epoch, validate each
EPOCHS = 12  # long enough that five kills land before the end, even on a fast machine
SHAPE = (24, 24, 8)


@pytest.fixture(scope="module")
def data(ct6_dataset: Path) -> Path:
    return ct6_dataset


class _Watched:
    """A subprocess whose stderr lines are collected by a thread, so a test can wait for one."""

    def __init__(self, cmd: list[str], cwd: Path, **kw: object) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, pred: object, timeout: float = 180.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if pred():  # type: ignore[operator]
                return True
            time.sleep(0.002)
        return False

    def kill(self) -> int:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._t.join(5)
        return self.proc.returncode

    def finish(self, timeout: float = 300.0) -> int:
        self.proc.wait(timeout)
        self._t.join(5)
        return self.proc.returncode


def _all_checkpoints_load(ckpt_dir: Path) -> list[int]:
    epochs = []
    for epoch, path in list_checkpoints(ckpt_dir):
        state = torch.load(path, weights_only=True)  # raises on a torn file
        assert state["trainer"]["iteration"] == epoch * state["trainer"]["epoch_length"]
        epochs.append(epoch)
    return epochs


@pytest.mark.slow
def test_training_killed_five_times_resumes_and_finishes(tmp_path: Path, data: Path) -> None:
    """Kills during a step, during validation, during a checkpoint write and at two random moments;
    every checkpoint stays readable and the last resume finishes with the right epoch count."""
    out, store = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "pipeline", "train", str(BUNDLE), "--manifest", str(data), "--epochs", str(EPOCHS),
           "--tracking-uri", store, "--verbose", *_sets({**FAST, "output_dir": str(out)})]  # engine lines mark moments
    rng = random.Random(0)
    ckpt = out / "checkpoints"

    def started() -> bool:  # the trainer runs iterations (not still importing or caching)
        return any("SupervisedTrainer: Engine run" in ln for ln in w.lines)

    def validating() -> bool:
        return sum("SupervisedEvaluator: Engine run" in ln for ln in w.lines) > n_val

    def writing() -> bool:
        return any(p.name.startswith("tmp") for p in ckpt.glob("*")) if ckpt.exists() else False

    moments = ["step", "validation", "checkpoint", "random", "random"]
    seen: list[str] = []
    for moment in moments:
        w = _Watched([*cmd, *(["--resume"] if ckpt.exists() else [])], tmp_path)
        n_val = 0
        if not w.wait_for(started):  # the previous kill came after the last checkpoint: nothing left
            assert w.finish() == 0 and "nothing to do" in "".join(w.lines), "".join(w.lines)[-3000:]
            break
        if moment == "step":
            time.sleep(rng.uniform(0.0, 0.3))
        elif moment == "validation":
            n_val = sum("SupervisedEvaluator: Engine run" in ln for ln in w.lines)
            w.wait_for(validating)
        elif moment == "checkpoint":
            w.wait_for(writing, timeout=120)
        else:
            time.sleep(rng.uniform(0.0, 2.0))
        if w.proc.poll() is not None:  # finished before the kill: nothing left to test at this moment
            break
        assert w.kill() == -signal.SIGKILL
        seen.append(moment)
        done = _all_checkpoints_load(ckpt)
        assert all(e <= EPOCHS for e in done)
    assert len(seen) >= 4, f"the run finished before the kills: {seen}"

    w = _Watched([*cmd, "--resume"], tmp_path)
    assert w.finish() == 0, "".join(w.lines)[-3000:]
    assert "Traceback" not in "".join(w.lines)
    assert _all_checkpoints_load(ckpt)[-1] == EPOCHS
    state = torch.load(list_checkpoints(ckpt)[-1][1], weights_only=True)["trainer"]
    assert state["max_epochs"] == EPOCHS and state["iteration"] == EPOCHS * 2
    assert not [p for p in ckpt.iterdir() if p.name.startswith("tmp")]
    assert (out / "model.pt").exists()
    torch.load(out / "model.pt", weights_only=True)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """phantom_ct_3d's configs and shipped weights, eager (no compile: tiny volumes)."""
    b = tmp_path_factory.mktemp("bundle")
    shutil.copytree(BUNDLE / "configs", b / "configs")
    shutil.copytree(BUNDLE / "models", b / "models")
    cfg = json.loads((b / "configs" / "inference.json").read_text())
    (b / "configs" / "inference.json").write_text(json.dumps({**cfg, "compile": False}))
    return b


def _predict_cmd(bundle: Path, inp: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "predict", str(bundle), "--input", str(inp), "--output", str(out),
            "--no-progress"]


def _masks(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(out.glob("ct_*.nii.gz"))}


@pytest.mark.slow
def test_batch_killed_five_times_matches_a_clean_run(bundle: Path, tmp_path: Path) -> None:
    write_dataset("ct3d", 12, tmp_path / "ds", seed=3, shape=SHAPE)
    inp = tmp_path / "ds" / "imagesTr"
    clean = tmp_path / "clean"
    assert subprocess.run(_predict_cmd(bundle, inp, clean), cwd=ROOT, capture_output=True).returncode == 0
    want = _masks(clean)
    assert len(want) == 12

    out = tmp_path / "out"
    rng = random.Random(1)
    kills = 0
    for k in range(5):
        w = _Watched(_predict_cmd(bundle, inp, out), ROOT)
        before = len(list(out.glob("ct_*.nii.gz")))
        # a random moment after this run has written at least one new mask (or right at start-up)
        w.wait_for(lambda b=before: len(list(out.glob("ct_*.nii.gz"))) > b, timeout=120) if k % 2 else None
        time.sleep(rng.uniform(0.0, 0.5))
        if w.proc.poll() is not None:
            break
        assert w.kill() == -signal.SIGKILL
        kills += 1
        for name, mask in _masks(out).items():  # whatever survived a kill is complete and right
            np.testing.assert_array_equal(mask, want[name])
    assert kills >= 3
    w = _Watched(_predict_cmd(bundle, inp, out), ROOT)
    assert w.finish() == 0, "".join(w.lines)[-3000:]
    got = _masks(out)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["study_id"] for r in rows) == sorted(n.removesuffix(".nii.gz") for n in want)
    assert {r["status"] for r in rows} <= {"ok", "skipped"}
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def _limit_file_size(nbytes: int):  # noqa: ANN202 - a preexec_fn
    def _set() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return _set


def test_disk_full_during_batch_is_one_line_per_study_and_no_corrupt_file(bundle: Path, tmp_path: Path) -> None:
    """A file-size limit below a mask's size: every study fails with one clear line, no mask or
    temp file is left, and the command exits 1 without a traceback."""
    write_dataset("ct3d", 2, tmp_path / "ds", seed=4, shape=(48, 48, 16))
    inp, out = tmp_path / "ds" / "imagesTr", tmp_path / "out"
    r = subprocess.run(_predict_cmd(bundle, inp, out), cwd=ROOT, capture_output=True, text=True, timeout=300,
                       preexec_fn=_limit_file_size(600))
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout
    assert not list(out.glob("ct_*.nii.gz"))
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert "too large" in (r.stdout + r.stderr).lower(), r.stderr[-2000:]


def test_disk_full_during_training_keeps_the_last_good_checkpoint(tmp_path: Path, data: Path) -> None:
    """Checkpoints cannot be written beyond the first epoch: training stops with one line, exit 1,
    and nothing torn is left under a checkpoint name. The MLflow store is past the limit too (a full
    disk stops every file growing): its failure is one warning line, not MLflow's traceback."""
    from mlflow.tracking import MlflowClient

    out, store = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("grown")).info.run_id
    for i in range(200):
        client.log_metric(run_id, "m", float(i), step=i)
    assert (tmp_path / "mlflow.db").stat().st_size > 64 * 1024
    cmd = [sys.executable, "-m", "pipeline", "train", str(BUNDLE), "--manifest", str(data), "--epochs", "2",
           "--tracking-uri", store, *_sets({**FAST, "output_dir": str(out)})]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       preexec_fn=_limit_file_size(64 * 1024))
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "records are kept in" in r.stderr  # pipeline.tracking's one line for the MLflow failure
    last = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1]
    assert "cannot write" in last and "disk full" in last and str(out) in last, last
    if (out / "model.pt").exists():
        torch.load(out / "model.pt", weights_only=True)
    if (out / "checkpoints").exists():
        _all_checkpoints_load(out / "checkpoints")
        assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith("tmp")]


def test_two_trainings_with_one_seed_give_the_same_dice(tmp_path: Path, data: Path, mlflow_store: str) -> None:
    store = mlflow_store
    a, b = (train_bundle(BUNDLE, manifest=data, epochs=2, tracking_uri=store,
                         overrides={**FAST, "output_dir": str(tmp_path / name)}) for name in ("a", "b"))
    assert a["val_dice"].keys() == b["val_dice"].keys()
    for organ in a["val_dice"]:
        assert abs(a["val_dice"][organ] - b["val_dice"][organ]) <= 1e-6, (a["val_dice"], b["val_dice"])
    wa = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    wb = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
