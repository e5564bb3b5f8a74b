"""Training engines on real phantom data: Dice rises and everything lands in MLflow; a SIGKILLed
run resumes to the same final epoch; NaN loss, a different network and a bad manifest stop
with one clear line."""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.checkpoints import list_checkpoints
from pipeline.errors import InputError, SegpipeError, UsageError
from pipeline.train import train_bundle

BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "phantom_ct_3d"
# 6 phantoms of 32x32x12 at native spacing: 4 train, 2 validation; 2 iterations per epoch
TINY = {"pixdim": [0.8, 0.8, 2.5], "roi_size": [32, 32, 12], "network_def#features": [8, 16, 32, 8],
        "num_workers": 0, "num_folds": 3, "batch_size": 2, "num_samples": 1, "flip_prob": 0.0,
        "rot90_prob": 0.0, "learning_rate": 0.01, "lr_scheduler#T_max": 1000}
# the same resampled to 16x16x12: 4x cheaper, for tests of the machinery rather than of learning (no QC pictures)
FAST = {**TINY, "pixdim": [1.6, 1.6, 2.5], "roi_size": [16, 16, 12], "qc_cases": 0}


@pytest.fixture(scope="module")
def data(ct6_dataset: Path) -> Path:
    return ct6_dataset


def _sets(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]


@pytest.fixture(scope="module")
def store(mlflow_store: str) -> str:
    """The session's MLflow store (runs are found by id)."""
    return mlflow_store


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory: pytest.TempPathFactory, data: Path, store: str) -> dict:
    """3 epochs, each validated; the summary."""
    out = tmp_path_factory.mktemp("three") / "run"
    return train_bundle(BUNDLE, manifest=data, epochs=3, tracking_uri=store,
                        overrides={**FAST, "output_dir": str(out), "val_interval": 1, "qc_cases": 3})


def test_training_logs_everything_to_mlflow(three_epochs: dict, store: str) -> None:
    s = three_epochs
    out = Path(s["output_dir"])
    assert s["epochs"] == 3 and s["tracking_ok"] and s["model_path"] == str(out / "model.pt")
    weights = torch.load(out / "model.pt", weights_only=True)
    assert "final_conv.weight" in weights or any(k.startswith("head") for k in weights)
    ckpt = torch.load(s["checkpoint"], weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(ckpt) and ckpt["trainer"]["iteration"] == 3 * 2

    client = MlflowClient(store)
    run = client.get_run(s["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "phantom_ct_3d"
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["network"] == "unet" and p["features"] == "[8, 16, 32, 8]" and p["lr"] == "0.01"
    assert (p["in_channels"], p["out_channels"]) == ("1", "4")
    assert p["roi_size"] == "[16, 16, 12]" and p["w0"] == "10.0" and p["sigma_mm"] == "5.0"
    assert p["loss"].endswith("BoundaryWeightedDiceCELoss") and p["amp"] == "True" and p["max_epochs"] == "3"
    t = run.data.tags
    assert t["bundle"] == "phantom_ct_3d" and t["bundle_version"] and t["device"] == "cpu"
    assert len(t["git_commit"]) == 40 and len(t["manifest_sha256"]) == 16
    assert len(client.get_metric_history(run.info.run_id, "train/loss_iteration")) == 3 * 2
    for key in ("train/loss", "train/lr", "perf/epoch_time_s", "perf/samples_per_s", "perf/voxels_per_s",
                "perf/data_wait_fraction"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 3, key
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert losses[-1] < losses[0]
    dice = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val/mean_dice"), key=lambda m: m.step)]
    assert len(dice) == 3
    for organ in ("liver", "kidney", "spleen"):
        assert len(client.get_metric_history(run.info.run_id, f"val/dice_{organ}")) == 3
    assert run.data.metrics["val/best_mean_dice"] == pytest.approx(max(dice))
    artifacts = {f.path for d in ("config", "model", "validation", "qc") for f in client.list_artifacts(run.info.run_id, d)}
    assert {"config/config_resolved.json", "model/model.pt", "validation/val_cases.csv"} <= artifacts
    assert sum(a.startswith("qc/qc_") and a.endswith(".png") for a in artifacts) == 2
    rows = (out / "val_cases.csv").read_text().splitlines()
    assert rows[0] == "case,dice_liver,dice_kidney,dice_spleen,dice_mean" and len(rows) == 3


def _losses(summary: dict) -> list[tuple[str, int, float]]:
    records = [json.loads(line) for line in Path(summary["metrics_jsonl"]).read_text().splitlines()]
    return [(r["key"], r["step"], r["value"]) for r in records if r.get("key") in ("train_loss", "train_loss_epoch")]


def test_validation_leaves_the_training_random_stream_alone(three_epochs: dict, tmp_path: Path, data: Path,
                                                            store: str, caplog: pytest.LogCaptureFixture) -> None:
    """One seed, a validation after every epoch (with QC pictures) or after the 2nd and the last:
    the same training, loss for loss (the validation loader used to draw its seed from torch's
    generator). The last epoch is validated once (the bundle's handler and segpipe's own both see
    it is not a multiple of val_interval)."""
    with caplog.at_level(logging.INFO, logger="pipeline.handlers"):
        s = train_bundle(BUNDLE, manifest=data, epochs=3, tracking_uri=store, register=False,
                         overrides={**FAST, "output_dir": str(tmp_path / "run"), "val_interval": 2})
    assert len(_losses(s)) == 3 * 2 + 3 and _losses(s) == _losses(three_epochs)
    assert re.findall(r"epoch (\d)/3 validation", caplog.text) == ["2", "3"]


def test_a_bundle_evaluator_leaves_the_random_state_alone(tmp_path: Path, data: Path) -> None:
    """The evaluator exactly as the bundle builds it (as under `python -m monai.bundle run`)."""
    import random

    import numpy as np

    from pipeline.bundle import get, load_bundle

    parser = load_bundle(BUNDLE, ("common.json", "train.json"),
                         {**FAST, "manifest": str(data), "output_dir": str(tmp_path)})
    evaluator = get(parser, "validate#evaluator")
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    evaluator.run(1)
    assert torch.equal(torch.get_rng_state(), before[0]) and (np.random.get_state()[1] == before[1]).all()
    assert random.getstate() == before[2] and (tmp_path / "model.pt").is_file()


@pytest.mark.slow
def test_val_dice_rises(tmp_path: Path, data: Path, store: str) -> None:
    s = train_bundle(BUNDLE, manifest=data, epochs=16, tracking_uri=store,
                     overrides={**TINY, "output_dir": str(tmp_path / "run"), "val_interval": 4})
    client = MlflowClient(store)
    dice = [m.value for m in sorted(client.get_metric_history(s["mlflow_run_id"], "val/mean_dice"), key=lambda m: m.step)]
    assert len(dice) == 4 and dice[-1] > dice[0] + 0.1, dice
    assert s["val_dice"]["liver"] > 0.4, s["val_dice"]


def test_sigkilled_run_resumes_to_the_same_final_epoch(tmp_path: Path, data: Path, store: str,
                                                       capfd: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline", "train", str(BUNDLE), "--manifest", str(data), "--epochs", "3",
           "--tracking-uri", store, *_sets({**FAST, "output_dir": str(out), "val_interval": 2, "ema_decay": 0.9})]
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 120
        while not list_checkpoints(out / "checkpoints") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.1)  # into the next epoch (3 epochs take far longer, even on a fast machine)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-2000:]
    saved = list_checkpoints(out / "checkpoints")
    assert saved and saved[-1][0] < 3
    for _, path in saved:  # whatever moment the kill hit, every checkpoint file is complete
        torch.load(path, weights_only=True)
    run_id = json.loads((out / "checkpoints" / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(store)
    runs_before = len(client.search_runs([client.get_run(run_id).info.experiment_id]))

    s = train_bundle(BUNDLE, manifest=data, epochs=3, resume=True, tracking_uri=store,
                     overrides={**FAST, "output_dir": str(out), "val_interval": 2, "ema_decay": 0.9})
    assert s["epochs"] == 3 and s["mlflow_run_id"] == run_id
    saved = torch.load(s["checkpoint"], weights_only=True)
    state = saved["trainer"]
    assert state["iteration"] == 3 * 2 and state["max_epochs"] == 3
    assert saved["ema"]["n_averaged"].item() == 3 * 2  # the weight average resumed with the run, not from zero
    ema = torch.load(out / "model_ema.pt", weights_only=True)
    assert ema.keys() == torch.load(out / "model.pt", weights_only=True).keys()
    assert "model_ema.pt" in [f.path.split("/")[-1] for f in MlflowClient(store).list_artifacts(run_id, "model")]
    assert [e for e, _ in list_checkpoints(out / "checkpoints")] == [2, 3]
    assert not list((out / "checkpoints").glob("tmp*"))
    client = MlflowClient(store)
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == runs_before  # no new run
    assert {m.step for m in client.get_metric_history(run_id, "val/mean_dice")} == {2, 3}  # every 2nd epoch and the last

    versions = len(client.search_model_versions(f"run_id = '{run_id}'"))
    assert versions == 1
    assert "Successfully registered model" not in capfd.readouterr().err  # MLflow's raw print: our log line says it
    again = train_bundle(BUNDLE, manifest=data, epochs=3, resume=True, tracking_uri=store,
                         overrides={**FAST, "output_dir": str(out), "val_interval": 2})
    assert again["epochs"] == 3  # nothing left to do: no restart from epoch 0
    assert len(client.search_model_versions(f"run_id = '{run_id}'")) == versions  # and no new model version


def test_a_run_stopped_before_its_checkpoint_logs_no_step_twice_after_resume(tmp_path: Path, data: Path, store: str,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after epoch 2 was validated and logged but before its checkpoint: the resume trains
    epoch 2 again. Its first records never reach MLflow (sent only once a checkpoint holds them)
    and are dropped from the journal, so every metric has each step once, in MLflow and in the
    journal progress.png is drawn from. Before, steps 2 and iterations 3-4 were there twice."""
    import contextlib

    import pipeline.checkpoints

    out = tmp_path / "run"
    run = {**FAST, "output_dir": str(out), "val_interval": 1}
    real = pipeline.checkpoints.write_errors

    @contextlib.contextmanager
    def interrupted(path: Path):
        if Path(path).name == "checkpoint_2.pt":
            raise KeyboardInterrupt
        with real(path):
            yield

    monkeypatch.setattr(pipeline.checkpoints, "write_errors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_bundle(BUNDLE, manifest=data, epochs=3, tracking_uri=store, overrides=run)
    monkeypatch.setattr(pipeline.checkpoints, "write_errors", real)
    run_id = json.loads((out / "checkpoints" / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(store)
    assert client.get_run(run_id).info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run_id, "val/mean_dice")] == [1]  # epoch 2 held back
    s = train_bundle(BUNDLE, manifest=data, epochs=3, resume=True, tracking_uri=store, overrides=run)
    assert s["mlflow_run_id"] == run_id and s["epochs"] == 3
    for key, steps in (("val/mean_dice", [1, 2, 3]), ("train/loss", [1, 2, 3]), ("train/lr", [1, 2, 3]),
                       ("train/loss_iteration", [1, 2, 3, 4, 5, 6])):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == steps, key
    journal = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("val_mean_dice", "train_loss"):
        steps = [r["step"] for r in journal if r.get("key") == key]
        assert len(steps) == len(set(steps)), (key, steps)


def test_more_epochs_on_resume_continue_the_cosine_schedule_of_the_longer_run(tmp_path: Path, data: Path,
                                                                           store: str) -> None:
    """A 2-epoch run resumed with --epochs 4 learns epochs 3-4 at the rates a 4-epoch run has
    there. Before, the checkpoint's schedule (T_max 2) went on: lr 0 at epoch 3, then rising."""
    run = {**FAST, "lr_scheduler#T_max": "@max_epochs", "val_interval": 2}
    whole = train_bundle(BUNDLE, manifest=data, epochs=4, tracking_uri=store,
                         overrides={**run, "output_dir": str(tmp_path / "whole")})
    train_bundle(BUNDLE, manifest=data, epochs=2, tracking_uri=store, overrides={**run, "output_dir": str(tmp_path / "ext")})
    longer = train_bundle(BUNDLE, manifest=data, epochs=4, resume=True, tracking_uri=store,
                          overrides={**run, "output_dir": str(tmp_path / "ext")})

    def rates(summary: dict) -> dict[int, float]:
        return {m.step: m.value for m in MlflowClient(store).get_metric_history(summary["mlflow_run_id"], "train/lr")}

    expected, got = rates(whole), rates(longer)
    assert got[3] == pytest.approx(expected[3]) and got[4] == pytest.approx(expected[4])
    assert got[3] > got[4] > 0


def test_resume_with_another_number_of_processes_is_refused(tmp_path: Path, data: Path, store: str) -> None:
    """A checkpoint records the number of processes it was trained with; each trains a share of an
    epoch with its own batch, so resuming with another number would change the recipe (and ignite
    kept the old epoch length): refused in one line, nothing trained."""
    run = {**FAST, "output_dir": str(tmp_path / "run"), "val_interval": 1}
    train_bundle(BUNDLE, manifest=data, epochs=1, tracking_uri=store, overrides=run)
    path = tmp_path / "run" / "checkpoints" / "checkpoint_1.pt"
    state = torch.load(path, weights_only=True)
    assert state["trainer"]["world_size"] == 1
    state["trainer"]["world_size"] = 2  # as torchrun --nproc_per_node 2 saves it
    torch.save(state, path)
    with pytest.raises(UsageError, match=r"checkpoint_1.pt: the run was trained with 2 process\(es\), this is 1: .*"
                                         r"torchrun --nproc_per_node 2") as e:
        train_bundle(BUNDLE, manifest=data, epochs=2, resume=True, tracking_uri=store, overrides=run)
    assert "\n" not in str(e.value)
    assert [k for k, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [1]


def test_a_sigterm_ends_the_run_as_killed_and_it_resumes(tmp_path: Path, data: Path, store: str) -> None:
    """SIGTERM (a scheduler ending the job, torchrun stopping its workers) is handled as Ctrl-C: one
    line (no traceback from Ignite's or MONAI's handlers), exit 143, the MLflow run KILLED (before: the process died at once and the run stayed
    RUNNING), and --resume goes on."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline", "train", str(BUNDLE), "--manifest", str(data), "--epochs", "20",
           "--tracking-uri", store, *_sets({**FAST, "output_dir": str(out), "val_interval": 5})]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list_checkpoints(out / "checkpoints") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "segpipe train: terminated (SIGTERM)"
    assert "Traceback" not in err and "terminating due to exception" not in err, err[-3000:]  # one line, not ~20
    run_id = json.loads((out / "checkpoints" / "mlflow_run.json").read_text())["run_id"]
    assert MlflowClient(store).get_run(run_id).info.status == "KILLED"
    s = train_bundle(BUNDLE, manifest=data, epochs=3, resume=True, tracking_uri=store,
                     overrides={**FAST, "output_dir": str(out), "val_interval": 5})
    assert s["mlflow_run_id"] == run_id and s["epochs"] == 3


def test_a_run_its_time_budget_ended_resumes_to_nothing(tmp_path: Path, data: Path, store: str) -> None:
    """The budget ends an epoch early (a mid-epoch checkpoint); --resume must neither train a second
    budget nor count the last epoch one short."""
    budgeted = {**FAST, "output_dir": str(tmp_path / "run"), "val_interval": 1000, "time_budget_min": 0.05}
    first = train_bundle(BUNDLE, manifest=data, epochs=500, tracking_uri=store, overrides=budgeted)
    assert 1 <= first["epochs"] < 500
    ckpts = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").glob("checkpoint_*.pt")}
    again = train_bundle(BUNDLE, manifest=data, epochs=500, resume=True, tracking_uri=store, overrides=budgeted)
    assert again["epochs"] == first["epochs"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").glob("checkpoint_*.pt")} == ckpts


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory: pytest.TempPathFactory, data: Path, store: str) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("two")
    overrides = {**FAST, "output_dir": str(tmp / "run"), "val_interval": 1}
    train_bundle(BUNDLE, manifest=data, epochs=2, tracking_uri=store, overrides=overrides)
    return tmp, overrides


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights(workers: int, two_epochs, tmp_path: Path,
                                                               data: Path, store: str) -> None:
    """Each epoch's random stream comes from (seed, epoch): stopped after epoch 1 and resumed, a run
    trains epoch 2 on the same crops in the same order as the run that was never stopped, also
    with DataLoader workers (kept between epochs). Before, the resumed run replayed epoch 1's
    stream, and persistent workers continued theirs, so it ended with other weights."""
    whole = Path(two_epochs[1]["output_dir"])
    if workers:
        whole = tmp_path / "whole"
        train_bundle(BUNDLE, manifest=data, epochs=2, tracking_uri=store,
                     overrides={**two_epochs[1], "output_dir": str(whole), "num_workers": workers})
    stopped = {**two_epochs[1], "output_dir": str(tmp_path / "run"), "num_workers": workers}
    train_bundle(BUNDLE, manifest=data, epochs=1, tracking_uri=store, overrides=stopped)
    train_bundle(BUNDLE, manifest=data, epochs=2, resume=True, tracking_uri=store, overrides=stopped)
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "checkpoint_2.pt", weights_only=True)["model"]
    expected = torch.load(whole / "checkpoints" / "checkpoint_2.pt", weights_only=True)["model"]
    assert resumed.keys() == expected.keys()
    differ = [k for k in expected if not torch.equal(resumed[k], expected[k])]
    assert not differ, f"{len(differ)} of {len(expected)} tensors differ, e.g. {differ[0]}"


def test_nan_loss_stops_naming_epoch_and_iteration_and_keeps_checkpoint(two_epochs, data: Path, store: str) -> None:
    tmp, overrides = two_epochs
    nan_loss = {**overrides, "loss": "$lambda pred, target: pred.mean() * float('nan')"}
    (Path(overrides["output_dir"]) / "config_resolved.json").unlink(missing_ok=True)  # resume with another loss
    with pytest.raises(SegpipeError, match=r"loss is nan at epoch 3, iteration 5 \(1 of the epoch\).*checkpoint_2\.pt"):
        train_bundle(BUNDLE, manifest=data, epochs=3, resume=True, tracking_uri=store, overrides=nan_loss)
    saved = list_checkpoints(Path(overrides["output_dir"]) / "checkpoints")
    assert [e for e, _ in saved] == [1, 2]
    weights = torch.load(saved[-1][1], weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    run_id = json.loads((Path(overrides["output_dir"]) / "checkpoints" / "mlflow_run.json").read_text())["run_id"]
    assert MlflowClient(store).get_run(run_id).info.status == "FAILED"


def test_resume_with_other_settings_is_refused_until_asked_for(tmp_path: Path, data: Path, store: str) -> None:
    """The rest of a run on another recipe (here another learning rate) is refused in one line
    naming the setting, before any training; more epochs are not a change of recipe; deleting
    config_resolved.json is the way to resume with other settings on purpose."""
    run = {**FAST, "output_dir": str(tmp_path / "run"), "val_interval": 1}
    train_bundle(BUNDLE, manifest=data, epochs=1, tracking_uri=store, overrides=run)
    other = {**run, "learning_rate": 0.02}
    # nothing to train: no refusal, and the run's record keeps the settings it was trained with
    assert train_bundle(BUNDLE, manifest=data, epochs=1, resume=True, tracking_uri=store, overrides=other)["epochs"] == 1
    assert json.loads((tmp_path / "run" / "config_resolved.json").read_text())["learning_rate"] == 0.01
    with pytest.raises(UsageError, match=r"--resume with other settings than the run was trained with "
                                         r"\(learning_rate 0.01 -> 0.02\).*delete config_resolved.json") as e:
        train_bundle(BUNDLE, manifest=data, epochs=2, resume=True, tracking_uri=store, overrides=other)
    assert "\n" not in str(e.value)
    assert [k for k, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [1]
    (tmp_path / "run" / "config_resolved.json").unlink()
    assert train_bundle(BUNDLE, manifest=data, epochs=2, resume=True, tracking_uri=store, overrides=other)["epochs"] == 2
    assert json.loads((tmp_path / "run" / "config_resolved.json").read_text())["learning_rate"] == 0.02
    assert train_bundle(BUNDLE, manifest=data, epochs=3, resume=True, tracking_uri=store, overrides=other)["epochs"] == 3
    # a setting only prediction reads (here the TTA axes) is not the recipe: the run goes on
    predicting = {**other, "tta_axes": [0]}
    assert train_bundle(BUNDLE, manifest=data, epochs=4, resume=True, tracking_uri=store,
                        overrides=predicting)["epochs"] == 4


def test_resume_settings_compare_ids_as_monai_parses_them(tmp_path: Path) -> None:
    """A parsed config holds "::" where the bundle file wrote MONAI's old "#" separator: the same
    settings either way (before the run's first parse, the check saw every such id as changed)."""
    from monai.bundle import ConfigParser

    from pipeline.checkpoints import check_resume_settings

    (tmp_path / "config_resolved.json").write_text(json.dumps({"run": ["$@train::trainer.run()"], "lr": 0.01}))
    check_resume_settings(ConfigParser({"run": ["$@train#trainer.run()"], "lr": 0.01}), tmp_path)
    with pytest.raises(UsageError, match=r"\(lr 0.01 -> 0.02\)"):
        check_resume_settings(ConfigParser({"run": ["$@train#trainer.run()"], "lr": 0.02}), tmp_path)


def test_resume_shows_the_nested_change_and_ignores_the_bundle_metadata(tmp_path: Path) -> None:
    """A bundle's new version or changelog (``_meta_``) is not another recipe: the resume goes on.
    A change deep in a section is named by its nested id, not by the section's common beginning."""
    from monai.bundle import ConfigParser

    from pipeline.checkpoints import check_resume_settings

    train = {"handlers": [{"_target_": "A", "interval": 1}, {"_target_": "B", "interval": 5}]}
    (tmp_path / "config_resolved.json").write_text(json.dumps(
        {"_meta_": {"version": "0.6.0", "authors": "x" * 60}, "train": train}))
    check_resume_settings(ConfigParser({"_meta_": {"version": "0.6.1", "authors": "x" * 60}, "train": train}),
                          tmp_path)
    other = {"handlers": [train["handlers"][0], {"_target_": "B", "interval": 6}]}
    with pytest.raises(UsageError, match=r"\(train::handlers::1::interval 5 -> 6\)"):
        check_resume_settings(ConfigParser({"train": other}), tmp_path)


def test_a_run_started_before_the_budget_handler_resumes(tmp_path: Path) -> None:
    """Bundles gained ``pipeline.time_budget.TimeBudget`` in train#handlers (the budget segpipe train
    applied already, now also under MONAI's runner): a run started with the older configs trains the
    same with the newer and resumes; any other handler change is still refused."""
    from monai.bundle import ConfigParser

    from pipeline.checkpoints import check_resume_settings

    old = {"handlers": [{"_target_": "LrScheduleHandler"}, {"_target_": "B", "interval": 5}]}
    (tmp_path / "config_resolved.json").write_text(json.dumps({"train": old, "time_budget_min": 28.5}))
    budget = {"_target_": "pipeline.time_budget.TimeBudget", "optimizer": "@optimizer", "minutes": "@time_budget_min"}
    new = {"handlers": [old["handlers"][0], budget, old["handlers"][1]]}
    check_resume_settings(ConfigParser({"train": new, "time_budget_min": 28.5}), tmp_path)
    other = {"handlers": [old["handlers"][0], budget, {"_target_": "B", "interval": 6}]}
    with pytest.raises(UsageError, match=r"interval 5 -> 6"):
        check_resume_settings(ConfigParser({"train": other, "time_budget_min": 28.5}), tmp_path)


def test_a_time_budget_is_minutes_for_both_runners() -> None:
    """``segpipe train``, crossval and the bundle's TimeBudget read time_budget_min alike: null or 0
    is no budget, a number is minutes, and a string or NaN is refused in one line (a NaN budget set
    every learning rate to NaN and never stopped; "" was no budget for one runner, an error for the other)."""
    import torch

    from pipeline.time_budget import TimeBudget, budget_minutes

    assert (budget_minutes(None), budget_minutes(0), budget_minutes(False), budget_minutes(28.5)) == (0, 0, 0, 28.5)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for bad in ("", "30", float("nan"), float("inf"), [30]):
        with pytest.raises(UsageError, match="setting 'time_budget_min': expected minutes"):
            TimeBudget(opt, bad)


def test_resume_compares_only_what_training_reads(tmp_path: Path) -> None:
    """With the ids training reads as roots, an id only prediction reads (``folds`` after an
    export) may change; one a root references, however deep, may not."""
    from monai.bundle import ConfigParser

    from pipeline.checkpoints import check_resume_settings

    config = {"lr": 0.01, "opt": {"lr": "$@lr * 2"}, "trainer": {"optimizer": "@opt"}, "folds": [],
              "predictor": {"weights": "@folds"}}
    (tmp_path / "config_resolved.json").write_text(json.dumps(config))
    check_resume_settings(ConfigParser({**config, "folds": [0, 1]}), tmp_path, ("trainer",))
    with pytest.raises(UsageError, match=r"\(folds \[\] -> \[0, 1\]\)"):
        check_resume_settings(ConfigParser({**config, "folds": [0, 1]}), tmp_path)  # no roots: everything
    with pytest.raises(UsageError, match=r"\(lr 0.01 -> 0.02\)"):
        check_resume_settings(ConfigParser({**config, "lr": 0.02}), tmp_path, ("trainer",))


def test_resume_with_a_different_network_is_one_line(two_epochs, data: Path, store: str) -> None:
    tmp, overrides = two_epochs
    other = {**overrides, "network_def#features": [8, 16, 24, 8]}
    with pytest.raises(InputError, match=r"checkpoint_2\.pt: checkpoint is from a different network") as e:
        train_bundle(BUNDLE, manifest=data, epochs=3, resume=True, tracking_uri=store, overrides=other)
    assert "\n" not in str(e.value)


def test_bad_manifest_stops_before_training(tmp_path: Path, data: Path, store: str) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(data.parent, bad)
    next((bad / "imagesTr").iterdir()).unlink()
    with pytest.raises(InputError, match="failed validation with 1 problem"):
        train_bundle(BUNDLE, manifest=bad / "dataset.json", epochs=1, tracking_uri=store,
                     overrides={**FAST, "output_dir": str(tmp_path / "run")})
    assert not (tmp_path / "run").exists()


def test_compile_on_a_cpu_without_a_cxx_compiler_is_one_clear_error(monkeypatch) -> None:
    """torch.compile on a CPU generates C++; with no compiler on PATH the run stops before its
    first step with the fix named (hippocampus_mri_3d trains compiled by default)."""
    from types import SimpleNamespace

    from pipeline.train import check_compile

    cpu, gpu = (SimpleNamespace(compile=True, state=SimpleNamespace(device=torch.device(d))) for d in ("cpu", "cuda"))
    if shutil.which("g++"):
        check_compile(cpu)  # a real compiler here: no error
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UsageError, match="needs a C\\+\\+ compiler .* --set compile=false"):
        check_compile(cpu)
    check_compile(gpu)  # CUDA compiles with triton, not a host C++ compiler
    check_compile(SimpleNamespace(compile=False, state=cpu.state))


def test_export_copies_weights_into_a_bundle_models_folder(tmp_path: Path) -> None:
    from pipeline.checkpoints import save_weights
    from pipeline.train_export import export_model

    net = torch.nn.Conv3d(1, 2, 3)
    weights = save_weights(net, tmp_path / "run" / "model.pt")
    dest = export_model(weights, tmp_path / "bundle")
    assert dest == tmp_path / "bundle" / "models" / "model.pt"
    loaded = torch.load(dest, weights_only=True)
    assert torch.equal(loaded["weight"], net.weight.detach())


def test_an_export_turns_a_planned_bundles_no_weights_status_into_what_it_has(tmp_path: Path) -> None:
    """A planned bundle's docs said "no weights yet" for good, after `segpipe train` and after
    export-ensemble; an export now rewrites that status (between its markers, again at a second
    export), and leaves docs written by hand alone."""
    from pipeline.checkpoints import save_weights
    from pipeline.plan_docs import UNTRAINED, status_block
    from pipeline.train_export import export_model

    weights = save_weights(torch.nn.Conv3d(1, 2, 3), tmp_path / "run" / "model.pt")
    docs = tmp_path / "bundle" / "docs" / "README.md"
    docs.parent.mkdir(parents=True)
    docs.write_text(f"# mine\n\n{status_block(UNTRAINED)}\n\n## Data\n")
    export_model(weights, tmp_path / "bundle", "**Status: trained.** first")
    assert docs.read_text() == f"# mine\n\n{status_block('**Status: trained.** first')}\n\n## Data\n"
    export_model(weights, tmp_path / "bundle", "**Status: trained.** second")
    assert "second" in docs.read_text() and "first" not in docs.read_text() and "no weights" not in docs.read_text()
    docs.write_text(f"# mine\n\n{UNTRAINED}\n")  # planned before the markers: its paragraph is replaced
    export_model(weights, tmp_path / "bundle", "**Status: trained.** third")
    assert docs.read_text() == f"# mine\n\n{status_block('**Status: trained.** third')}\n"
    docs.write_text("# hand-written\n**Status: our own words.**\n")
    export_model(weights, tmp_path / "bundle", "**Status: trained.** fourth")
    assert docs.read_text() == "# hand-written\n**Status: our own words.**\n"
    latin1 = f"# Münster\r\n\r\n{status_block(UNTRAINED)}\r\n".encode("latin-1")
    docs.write_bytes(latin1)  # not UTF-8: left alone, and the export still done
    (tmp_path / "bundle" / "models" / "model.pt").unlink()
    export_model(weights, tmp_path / "bundle", "**Status: trained.** fifth")
    assert docs.read_bytes() == latin1 and (tmp_path / "bundle" / "models" / "model.pt").is_file()
    docs.write_bytes(latin1.decode("latin-1").encode())  # UTF-8 with CRLF line endings: kept
    export_model(weights, tmp_path / "bundle")  # without a status: a line naming the weights
    text = docs.read_bytes().decode()
    assert text.startswith("# Münster\r\n\r\n<!-- segpipe: weights status -->\n**Status: trained.** `models/model.pt` is")
    assert text.endswith("<!-- /segpipe: weights status -->\r\n")


@pytest.mark.slow
def test_plain_monai_bundle_run_trains_the_bundle(tmp_path: Path, data: Path) -> None:
    args = [f"--{k}={json.dumps(v)}" for k, v in {**FAST, "max_epochs": 2, "val_interval": 1}.items()]
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                           str([str(BUNDLE / "configs" / "common.json"), str(BUNDLE / "configs" / "train.json")]),
                           "--bundle_root", str(BUNDLE), "--dataset_dir", str(data.parent),
                           "--output_dir", str(tmp_path / "out"), "--tracking", "mlflow", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Epoch[2] Metrics -- val_mean_dice" in proc.stdout + proc.stderr
    runs = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlruns.db'}").search_runs(["1"])
    assert len(runs) == 1 and "val_mean_dice" in runs[0].data.metrics


def test_early_stopping_ends_a_run_that_stops_improving(tmp_path: Path, data: Path, store: str) -> None:
    frozen = {**FAST, "output_dir": str(tmp_path / "run"), "val_interval": 1, "learning_rate": 0.0,
              "early_stop_patience": 1}  # lr 0: Dice never improves after the first validation
    s = train_bundle(BUNDLE, manifest=data, epochs=10, tracking_uri=store, overrides=frozen)
    assert s["epochs"] == 2 and s["best_epoch"] == 1


def test_early_stopping_counts_on_after_a_resume(tmp_path: Path, data: Path, store: str) -> None:
    """Its count of validations without a gain is checkpointed: stopped after 1 of 2, a resumed run
    stops at the next one, not 2 validations later (before, the count restarted from nothing)."""
    frozen = {**FAST, "output_dir": str(tmp_path / "run"), "val_interval": 1, "learning_rate": 0.0,
              "early_stop_patience": 2}
    first = train_bundle(BUNDLE, manifest=data, epochs=2, tracking_uri=store, overrides=frozen)
    assert first["epochs"] == 2
    assert torch.load(first["checkpoint"], weights_only=True)["early_stop"]["counter"] == 1
    s = train_bundle(BUNDLE, manifest=data, epochs=10, resume=True, tracking_uri=store, overrides=frozen)
    assert s["epochs"] == 3 and s["best_epoch"] == 1


def test_persistent_cache_stops_at_the_first_random_transform(tmp_path: Path, data: Path) -> None:
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandSpatialCropd

    from pipeline.loaders import cached_dataset, loader
    from pipeline.manifest import datalist

    items = datalist(data, "all")[:2]
    t = Compose([LoadImaged(keys=["image", "label"]), EnsureChannelFirstd(keys=["image", "label"]),
                 RandSpatialCropd(keys=["image", "label"], roi_size=(8, 8, 4), random_size=False)])
    ds = cached_dataset(items, t, cache_dir=str(tmp_path / "cache"))
    assert tuple(ds[0]["image"].shape) == (1, 8, 8, 4)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1  # the loaded volume, not the crop
    batch = next(iter(loader(ds, batch_size=2)))
    assert tuple(batch["image"].shape) == (2, 1, 8, 8, 4)


def test_init_weights_starts_each_fold_from_its_own_saved_weights(tmp_path: Path, data: Path, store: str) -> None:
    """``init_weights`` (``{fold}`` is the fold): training starts from those weights, not random
    ones (lr 0 keeps them, so model.pt holds them exactly); another network's weights, or a
    missing file, stop in one line with nothing written."""
    from pipeline.bundle import get, load_bundle

    net = get(load_bundle(BUNDLE, ("common.json", "train.json"), FAST), "network_def", BUNDLE)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.25)
    start = {k: v.clone() for k, v in net.named_parameters()}
    (tmp_path / "cv" / "fold_1").mkdir(parents=True)
    torch.save(net.state_dict(), tmp_path / "cv" / "fold_1" / "model.pt")
    frozen = {**FAST, "output_dir": str(tmp_path / "run"), "val_interval": 1, "learning_rate": 0.0, "fold": 1,
              "init_weights": str(tmp_path / "cv" / "fold_{fold}" / "model.pt")}
    s = train_bundle(BUNDLE, manifest=data, epochs=1, tracking_uri=store, overrides=frozen)
    trained = torch.load(s["model_path"], weights_only=True)
    assert all(torch.equal(trained[k], v) for k, v in start.items())

    other = {**frozen, "output_dir": str(tmp_path / "other"), "network_def#features": [8, 16, 24, 8]}
    with pytest.raises(InputError, match=r"fold_1/model\.pt: weights do not fit the bundle's network_def") as e:
        train_bundle(BUNDLE, manifest=data, epochs=1, tracking_uri=store, overrides=other)
    assert "\n" not in str(e.value) and not (tmp_path / "other").exists()
    assert "] in the file, [" in str(e.value) and "in the network" in str(e.value)  # what differs, not torch's heading
    with pytest.raises(InputError, match=r"fold_2/model\.pt: init_weights file not found"):
        train_bundle(BUNDLE, manifest=data, epochs=1, tracking_uri=store, overrides={**other, "fold": 2})


def test_weights_trained_with_another_network_are_not_exported_into_the_bundle(tmp_path: Path, data: Path, store: str,
                                                                               caplog: pytest.LogCaptureFixture) -> None:
    """`segpipe train --set network_def#features=...` of a bundle that exports copied weights into
    models/ that its own network could not load (predict then failed); the export is skipped, said
    up front, and goes ahead once the bundle's configs say the same."""
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("runs*"))
    before = (bundle / "models" / "model.pt").read_bytes()
    run = {**FAST, "export": True, "output_dir": str(tmp_path / "run")}
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        summary = train_bundle(bundle, manifest=data, epochs=1, tracking_uri=store, overrides=run)
    assert "exported" not in summary and (bundle / "models" / "model.pt").read_bytes() == before
    assert "will not be exported" in caplog.text and '--set network_def#features=[8, 16, 32, 8]' in caplog.text
    common = json.loads((bundle / "configs" / "common.json").read_text())
    common["network_def"]["features"], common["roi_size"], common["pixdim"] = (FAST["network_def#features"],
                                                                               FAST["roi_size"], FAST["pixdim"])
    (bundle / "configs" / "common.json").write_text(json.dumps(common))
    same = {k: v for k, v in run.items() if k not in ("network_def#features", "roi_size", "pixdim")}
    summary = train_bundle(bundle, manifest=data, epochs=1, tracking_uri=store,  # prediction-only ids do not count
                           overrides={**same, "output_dir": str(tmp_path / "run2"), "sw_batch_size": 2, "tta": False})
    assert summary["exported"] and (bundle / "models" / "model.pt").read_bytes() != before
