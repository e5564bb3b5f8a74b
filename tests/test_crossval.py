"""segpipe crossval: a real 2-fold cross-validation of tiny phantoms (folds, out-of-fold masks and
Dice, MLflow parent and children, resume), bad input, the fold ensemble in prediction."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from test_train import FAST  # tests/ is on sys.path

from pipeline.crossval import crossval, fold_cases, predict_fold
from pipeline.crossval_export import export_ensemble
from pipeline.ensemble import Ensemble
from pipeline.errors import InputError, UsageError
from pipeline.manifest import load_manifest
from pipeline.postprocess import label_cleanup
from pipeline.predict import predict

BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "phantom_ct_3d"
SMALL = {**FAST, "val_interval": 1}


def _small_bundle(dest: Path) -> Path:
    """The phantom bundle with SMALL's window and network in its own common.json, as a bundle whose
    folds were trained with them must say (export refuses fold settings the bundle lacks)."""
    shutil.copytree(BUNDLE, dest, ignore=shutil.ignore_patterns("runs*"))
    common = dest / "configs" / "common.json"
    text = common.read_text()
    for key, value in (("roi_size", SMALL["roi_size"]), ("features", SMALL["network_def#features"])):
        old = f'"{key}": {json.dumps(json.loads(text)[key])}'
        assert old in text
        text = text.replace(old, f'"{key}": {json.dumps(value)}')
    common.write_text(text)
    return dest


@pytest.fixture(scope="module")
def cv(tmp_path_factory: pytest.TempPathFactory, ct6_dataset: Path, mlflow_store: str) -> dict:
    """Fold 1 alone for one epoch first (an interrupted cross-validation), then all folds for two."""
    tmp = tmp_path_factory.mktemp("cv")
    out, bundle = tmp / "cv", _small_bundle(tmp / "bundle")
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("pipeline").addHandler(handler)
    try:
        first = crossval(bundle, ct6_dataset, folds=2, fold_ids=[1], epochs=1, output_dir=out,
                         tracking_uri=mlflow_store, overrides={**SMALL, "export": True})  # as planned bundles have it
        result = crossval(bundle, ct6_dataset, folds=2, epochs=2, output_dir=out, tracking_uri=mlflow_store,
                          overrides=SMALL)
    finally:
        logging.getLogger("pipeline").removeHandler(handler)
    return {"out": out, "first": first, "result": result, "bundle": bundle, "warnings": warnings}


def test_a_clean_cross_validation_warns_of_nothing(cv: dict) -> None:
    """A fold that starts is not a failed --resume: a clean run's log has no warning to read past."""
    assert not cv["warnings"], cv["warnings"]


def test_a_fold_does_not_export_into_the_bundle(cv: dict) -> None:
    """A fold's model is one member of the ensemble: the bundle's models/model.pt stays what it was
    even where the bundle's own training exports (planned bundles: export true)."""
    assert (cv["bundle"] / "models" / "model.pt").read_bytes() == (BUNDLE / "models" / "model.pt").read_bytes()
    assert not list((cv["bundle"] / "models").glob("fold_*.pt"))


def test_every_case_is_predicted_by_the_fold_that_did_not_train_on_it(cv: dict, ct6_dataset: Path) -> None:
    out, result = cv["out"], cv["result"]
    ids = {e["id"] for e in load_manifest(ct6_dataset)["training"]}
    folds = fold_cases(ct6_dataset, 2, 0)
    assert sorted(sum(folds, [])) == sorted(ids) and not set(folds[0]) & set(folds[1])
    assert cv["first"]["cases_scored"] == len(folds[1])  # after fold 1 alone: its cases only
    assert result["cases_scored"] == result["cases_total"] == len(ids)
    saved = json.loads((out / "crossval.json").read_text())
    assert set(saved["cases"]) == ids
    for k, fold in enumerate(folds):
        assert {c for c, v in saved["cases"].items() if v["fold"] == k} == set(fold)
        assert (out / f"fold_{k}" / "model.pt").is_file()
    for sid in ids:  # masks in the source geometry of each study
        mask, src = nib.load(out / "oof" / f"{sid}.nii.gz"), nib.load(ct6_dataset.parent / "imagesTr" / f"{sid}.nii.gz")
        assert mask.shape == src.shape and np.allclose(mask.affine, src.affine)
    s = saved["summary"]
    assert set(s["dice"]) == {"liver", "kidney", "spleen"} and 0 <= s["mean_dice"] <= 1
    assert {"mean", "sd"} <= set(s["dice"]["liver"]) and set(saved["per_fold"]) == {"0", "1"}
    assert saved["postprocessing"]["chosen"] in saved["postprocessing"]["mean_dice"]
    chosen = saved["postprocessing"]  # the chosen post-processing's summary: its mean Dice, HD95 per class
    assert chosen["summary"]["mean_dice"] == pytest.approx(chosen["mean_dice"][chosen["chosen"]])
    assert set(chosen["summary"]["hd95_mm"]) == set(saved["summary"]["hd95_mm"])
    assert set(chosen["per_fold"]) == set(saved["per_fold"])
    for c, by_class in saved["postprocessing"]["dice"].items():  # per class too, for each candidate
        assert set(by_class) == {"liver", "kidney", "spleen"}
        assert np.mean(list(by_class.values())) == pytest.approx(saved["postprocessing"]["mean_dice"][c])


def test_out_of_fold_masks_are_raw_where_the_bundle_post_processes(cv: dict, ct6_dataset: Path,
                                                                    tmp_path: Path) -> None:
    """The post-processing is chosen on the out-of-fold masks, so they are predicted without it even
    when the bundle already post-processes (an export-ensemble after the first folds sets it)."""
    bundle, out = tmp_path / "bundle", tmp_path / "cv"
    shutil.copytree(cv["bundle"], bundle)
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    inference["postprocess"] = {"keep_largest_foreground": True}
    (bundle / "configs" / "inference.json").write_text(json.dumps(inference, indent=2))
    (out / "fold_0").mkdir(parents=True)
    shutil.copy(cv["out"] / "fold_0" / "model.pt", out / "fold_0" / "model.pt")
    ids = fold_cases(ct6_dataset, 2, 0)[0]
    predict_fold(bundle, ct6_dataset, out, 0, ids, "cpu", SMALL)
    cleanup, changed = label_cleanup(inference["postprocess"]), 0
    for sid in ids:
        raw = np.asarray(nib.load(cv["out"] / "oof" / f"{sid}.nii.gz").dataobj)
        np.testing.assert_array_equal(np.asarray(nib.load(out / "oof" / f"{sid}.nii.gz").dataobj), raw)
        changed += int((np.asarray(cleanup(torch.as_tensor(raw.astype(np.int64))[None])[0]) != raw).any())
    assert changed, "the bundle's post-processing changes none of these masks: the test proves nothing"


def test_the_interrupted_fold_resumed_and_mlflow_has_one_parent_and_two_children(cv: dict, mlflow_store: str) -> None:
    out, result = cv["out"], cv["result"]
    ckpts = sorted(p.name for p in (out / "fold_1" / "checkpoints").glob("checkpoint_*.pt"))
    assert ckpts == ["checkpoint_1.pt", "checkpoint_2.pt"]  # epoch 1 from the first call, 2 from the resume
    client = MlflowClient(mlflow_store)
    parent = client.get_run(result["mlflow"]["mlflow_run_id"])
    assert cv["first"]["mlflow"]["mlflow_run_id"] == parent.info.run_id  # the rerun continued the parent
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["fold"] for r in children) == ["0", "1"]  # fold 1's run continued, not a third
    assert all(r.info.status == "FINISHED" for r in children)


def test_the_parent_run_has_sectioned_metrics_params_its_dataset_and_names_that_tell_crossvals_apart(
        cv: dict, mlflow_store: str, ct6_dataset: Path) -> None:
    """The parent had flat metric names (oof_mean_dice, fold0_mean_dice, oof_hd95_kidney) where
    training runs have sections, no params and no dataset; its and its folds' names were the
    bundle's alone, the same for every cross-validation of it."""
    from pipeline.manifest import manifest_hash

    out, result = cv["out"], cv["result"]
    client = MlflowClient(mlflow_store)
    parent = client.get_run(result["mlflow"]["mlflow_run_id"])
    metrics, summary = parent.data.metrics, result["summary"]
    assert metrics["oof/mean_dice"] == pytest.approx(summary["mean_dice"])
    for c in ("liver", "kidney", "spleen"):
        assert metrics[f"oof/dice_{c}"] == pytest.approx(summary["dice"][c]["mean"])
        assert f"oof/hd95_mm_{c}" in metrics  # NaN where no case defines it: there all the same
    assert {"oof/fold0_mean_dice", "oof/fold1_mean_dice", "oof/cases_scored", "oof/cases_total"} <= set(metrics)
    assert not [k for k in metrics if "/" not in k]
    # fold 1 alone, then both: two points at steps 0 and 1, not two at step 0 (a vertical line)
    history = client.get_metric_history(parent.info.run_id, "oof/cases_scored")
    assert sorted((m.step, m.value) for m in history) == [(0, 3.0), (1, 6.0)]
    params = parent.data.params
    assert params["bundle"] == "phantom_ct_3d" and params["folds"] == "2" and params["seed"] == "0"
    assert params["manifest"] == str(ct6_dataset.resolve()) and "bundle_version" in params
    assert params["max_epochs"] == "1" and "fold" not in params  # the first call's --epochs: MLflow keeps it
    assert json.loads(params["overrides"])["num_samples"] == SMALL["num_samples"]
    (dataset,) = parent.inputs.dataset_inputs
    assert dataset.dataset.digest == manifest_hash(ct6_dataset.resolve())
    assert parent.info.run_name.startswith(f"crossval-phantom_ct_3d-{out.name}-")
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name.rsplit("-", 2)[0] for r in children) == [f"{out.name}-fold0", f"{out.name}-fold1"]


def test_folds_started_side_by_side_share_one_parent_run(tmp_path: Path, ct6_dataset: Path, mlflow_store: str) -> None:
    """Two ``segpipe crossval --fold K --export`` processes started together into one folder (two
    GPUs, two jobs of a scheduler) log their folds under one MLflow parent run, the one that scores
    last scores every case, and the first to finish succeeds without exporting (its partner's fold
    is not trained yet) while the last exports both folds."""
    import subprocess
    import sys

    from test_train import _sets

    client = MlflowClient(mlflow_store)
    client.search_experiments()  # the store exists before the two processes meet in it
    out, bundle = tmp_path / "cv", _small_bundle(tmp_path / "bundle")
    small = {k: v for k, v in SMALL.items() if k != "network_def#features"}  # the bundle's own network
    cmd = [sys.executable, "-m", "pipeline", "crossval", str(bundle), "--manifest", str(ct6_dataset), "--folds", "2",
           "--epochs", "1", "--output", str(out), "--tracking-uri", mlflow_store, "--export", *_sets(small)]
    procs = [subprocess.Popen([*cmd, "--fold", str(k)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-2000:] for log in logs)
    parent_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    parents = client.search_runs([client.get_run(parent_id).info.experiment_id],
                                 filter_string="tags.crossval = 'parent'")
    assert [r.info.run_id for r in parents if r.data.tags.get("manifest") == str(ct6_dataset.resolve())
            and r.info.start_time >= (out / "splits.json").stat().st_mtime * 1000 - 5000] == [parent_id]
    children = client.search_runs([client.get_run(parent_id).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert sorted(r.data.tags["fold"] for r in children) == ["0", "1"]
    saved = json.loads((out / "crossval.json").read_text())
    assert saved["cases_scored"] == 6 and {c["fold"] for c in saved["cases"].values()} == {0, 1}
    assert any("\nexported " in log for log in logs)
    assert sorted(p.name for p in (bundle / "models").glob("fold_*.pt")) == ["fold_0.pt", "fold_1.pt"]
    exported = json.loads((bundle / "configs/metadata.json").read_text())["ensemble"]
    assert exported["folds"] == [0, 1] and exported["crossval"]["cases"] == 6  # the complete figures


def test_a_rerun_skips_finished_folds(cv: dict, ct6_dataset: Path, mlflow_store: str) -> None:
    """Without a word of resuming: their records (trained.json: its wall time) are not rewritten."""
    out = cv["out"]
    before = {p: p.stat().st_mtime_ns for p in out.glob("fold_*/checkpoints/*.pt")}
    records = {p: p.read_bytes() for p in out.glob("fold_*/trained.json")}
    again = crossval(BUNDLE, ct6_dataset, folds=2, epochs=2, output_dir=out, tracking_uri=mlflow_store, overrides=SMALL)
    assert {p: p.stat().st_mtime_ns for p in out.glob("fold_*/checkpoints/*.pt")} == before
    assert len(records) == 2 and {p: p.read_bytes() for p in out.glob("fold_*/trained.json")} == records
    assert again["summary"]["mean_dice"] == pytest.approx(cv["result"]["summary"]["mean_dice"])


def test_a_finished_fold_goes_on_with_a_longer_schedule_and_refuses_other_settings(cv: dict, tmp_path: Path,
                                                                                    ct6_dataset: Path,
                                                                                    mlflow_store: str) -> None:
    """A longer schedule from the bundle (max_epochs, no --epochs) continues the folds, as more
    --epochs do; other --set values of training ids are refused in one line (resuming a finished
    fold trained nothing and recorded them in its trained.json as if it had)."""
    out = tmp_path / "cv"
    shutil.copytree(cv["out"], out)
    with pytest.raises(UsageError, match=r"fold 0: .*trained.json records a training with --set values .* delete"):
        crossval(BUNDLE, ct6_dataset, folds=2, epochs=2, output_dir=out, tracking_uri=mlflow_store,
                 overrides={**SMALL, "learning_rate": 0.5})
    longer = crossval(BUNDLE, ct6_dataset, folds=2, output_dir=out, tracking_uri=mlflow_store,
                      overrides={**SMALL, "max_epochs": 3})
    assert longer["cases_scored"] == 6
    assert [json.loads((out / f"fold_{k}" / "trained.json").read_text())["epochs"] for k in (0, 1)] == [3, 3]


def test_a_fold_carried_without_checkpoints_is_not_trained_again(cv: dict, tmp_path: Path, ct6_dataset: Path,
                                                                 mlflow_store: str) -> None:
    """What is committed of a long cross-validation between sessions: each finished fold's
    model.pt and trained.json, the out-of-fold masks and the split; no checkpoints."""
    carried = tmp_path / "cv"
    shutil.copytree(cv["out"], carried, ignore=shutil.ignore_patterns("checkpoints", "mlflow_run.json"))
    for k in (0, 1):
        assert json.loads((carried / f"fold_{k}" / "trained.json").read_text())["epochs"] == 2
    weights = {k: (carried / f"fold_{k}" / "model.pt").read_bytes() for k in (0, 1)}
    again = crossval(BUNDLE, ct6_dataset, folds=2, epochs=2, output_dir=carried, tracking_uri=mlflow_store,
                     overrides=SMALL)
    assert not list(carried.glob("fold_*/checkpoints/*.pt"))  # nothing trained from scratch
    assert {k: (carried / f"fold_{k}" / "model.pt").read_bytes() for k in (0, 1)} == weights
    assert again["summary"]["mean_dice"] == pytest.approx(cv["result"]["summary"]["mean_dice"])
    elsewhere = tmp_path / "three"  # the same folds carried into a 3-fold cross-validation: they trained
    for k in (0, 1):                # on cases it would score them on
        shutil.copytree(carried / f"fold_{k}", elsewhere / f"fold_{k}")
    with pytest.raises(InputError, match=r"fold_0/trained\.json: fold 0 was trained for another split \(2 folds"):
        crossval(BUNDLE, ct6_dataset, folds=3, fold_ids=[0, 1], epochs=2, output_dir=elsewhere,
                 tracking_uri=mlflow_store, overrides=SMALL)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["fold_0", "fold_1"]  # nothing written


def test_a_fold_trained_again_gets_its_out_of_fold_masks_predicted_again(cv: dict, tmp_path: Path,
                                                                        ct6_dataset: Path) -> None:
    """Out-of-fold masks are stamped with their model's hash: when a fold's model.pt changes (trained
    again in the folder), its masks are predicted again, not kept; the other fold's stay."""
    carried = tmp_path / "cv"
    shutil.copytree(cv["out"], carried, ignore=shutil.ignore_patterns("checkpoints", "mlflow_run.json"))
    folds = fold_cases(ct6_dataset, 2, 0)
    assert (carried / "oof" / ".fold_0.model").is_file()
    mtimes = {sid: (carried / "oof" / f"{sid}.nii.gz").stat().st_mtime_ns for sid in sum(folds, [])}
    predict_fold(cv["bundle"], ct6_dataset, carried, 0, folds[0], "cpu", SMALL)  # same model: nothing to do
    assert {s: (carried / "oof" / f"{s}.nii.gz").stat().st_mtime_ns for s in mtimes} == mtimes
    shutil.copy(carried / "fold_1" / "model.pt", carried / "fold_0" / "model.pt")  # fold 0 "trained again"
    predict_fold(cv["bundle"], ct6_dataset, carried, 0, folds[0], "cpu", SMALL)
    assert all((carried / "oof" / f"{s}.nii.gz").stat().st_mtime_ns != mtimes[s] for s in folds[0])
    assert all((carried / "oof" / f"{s}.nii.gz").stat().st_mtime_ns == mtimes[s] for s in folds[1])


def test_the_folds_are_those_training_reads_from_the_bundles_splits_file(tmp_path: Path, ct6_dataset: Path,
                                                                         mlflow_store: str, monkeypatch) -> None:
    """A bundle that declares ``splits_file`` (planned bundles: their own splits.json) trains on that
    split, so its out-of-fold cases come from it too, not from a different splits.json beside the
    manifest: otherwise a fold would be scored on cases it trained on."""
    import pipeline.train

    data, bundle = tmp_path / "data", tmp_path / "bundle"
    shutil.copytree(ct6_dataset.parent, data)
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("runs*"))
    common = json.loads((bundle / "configs/common.json").read_text())
    common["splits_file"] = "$@bundle_root + '/splits.json'"
    (bundle / "configs/common.json").write_text(json.dumps(common))
    ids = sorted(e["id"] for e in load_manifest(data / "dataset.json")["training"])
    mine = [{"train": ids[3:], "val": ids[:3]}, {"train": ids[:3], "val": ids[3:]}]
    (bundle / "splits.json").write_text(json.dumps(mine))  # nnU-Net's splits_final.json form
    (data / "splits.json").write_text(json.dumps({"k": 2, "seed": 0, "folds": [
        {"train": ids[:-2], "val": ids[-2:]}, {"train": ids[-2:], "val": ids[:-2]}]}))

    class Trained(Exception):
        pass

    def train_bundle(*args, **kwargs):
        raise Trained

    monkeypatch.setattr(pipeline.train, "train_bundle", train_bundle)
    with pytest.raises(Trained):
        crossval(bundle, data / "dataset.json", folds=2, output_dir=tmp_path / "cv", tracking_uri=mlflow_store,
                 overrides=SMALL)
    assert json.loads((tmp_path / "cv" / "splits.json").read_text())["val"] == [ids[:3], ids[3:]]


def test_a_broken_crossval_result_exports_nothing(tmp_path: Path) -> None:
    """export-ensemble reads and checks everything before it writes: a crossval.json that is not a
    result is one line, and the bundle stays as it was."""
    bundle, cv_dir = tmp_path / "bundle", tmp_path / "cv"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("runs*"))
    before = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    cv_dir.mkdir()
    for text in ('{"folds": 2, "summary": {}}', "[1, 2]", "{not json"):
        (cv_dir / "crossval.json").write_text(text)
        with pytest.raises(InputError, match="crossval.json: not a segpipe crossval result"):
            export_ensemble(bundle, cv_dir)
    assert {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before


def test_bad_input_is_one_line_and_trains_nothing(tmp_path: Path, ct6_dataset: Path, mlflow_store: str) -> None:
    kw = {"output_dir": tmp_path / "cv", "tracking_uri": mlflow_store, "overrides": SMALL, "epochs": 1}
    with pytest.raises(UsageError, match="--fold 2: the split has folds 0..1"):
        crossval(BUNDLE, ct6_dataset, folds=2, fold_ids=[2], **kw)
    with pytest.raises(UsageError, match="--folds 6: .* has only 5 patients"):
        crossval(BUNDLE, ct6_dataset, folds=6, **kw)
    data = tmp_path / "data"
    shutil.copytree(ct6_dataset.parent, data)
    ids = [e["id"] for e in load_manifest(data / "dataset.json")["training"]]
    splits = {"k": 2, "seed": 0, "folds": [{"train": ids[2:-1], "val": ids[:2]}, {"train": ids[:2], "val": ids[2:-1]}]}
    (data / "splits.json").write_text(json.dumps(splits))
    with pytest.raises(InputError, match=f"does not match .*case {ids[-1]} missing"):
        crossval(BUNDLE, data / "dataset.json", folds=2, **kw)
    overlap = {"k": 2, "seed": 0, "folds": [{"train": ids[3:], "val": ids[:3]}, {"train": ids[:2], "val": ids[2:]}]}
    (data / "splits.json").write_text(json.dumps(overlap))  # ids[2] validated by both folds
    with pytest.raises(InputError, match=f"case {ids[2]} is in the validation cases of folds 0 and 1"):
        crossval(BUNDLE, data / "dataset.json", folds=2, **kw)
    assert not list((tmp_path / "cv").glob("fold_*"))
    (data / "splits.json").unlink()
    (data / "imagesTr" / f"{ids[0]}.nii.gz").unlink()  # data that fails validation: no folder, split or MLflow run
    runs = len(MlflowClient(mlflow_store).search_runs(
        [e.experiment_id for e in MlflowClient(mlflow_store).search_experiments()], max_results=1000))
    with pytest.raises(InputError, match=f"failed validation with 1 problem.*{ids[0]}.nii.gz: missing file"):
        crossval(BUNDLE, data / "dataset.json", folds=2, **{**kw, "output_dir": tmp_path / "cv2"})
    assert not (tmp_path / "cv2").exists()
    assert len(MlflowClient(mlflow_store).search_runs(
        [e.experiment_id for e in MlflowClient(mlflow_store).search_experiments()], max_results=1000)) == runs


def test_ensemble_averages_member_probabilities() -> None:
    class Fixed(torch.nn.Module):
        def __init__(self, logits: list[float]) -> None:
            super().__init__()
            self.logits = torch.tensor(logits)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.logits.view(1, -1, 1, 1, 1).expand(x.shape[0], -1, *x.shape[2:])

    a, b = Fixed([2.0, 0.0, -1.0]), Fixed([-1.0, 3.0, 0.5])
    x = torch.zeros(2, 1, 3, 4, 5)
    got = torch.softmax(Ensemble([a, b])(x), dim=1)
    want = (torch.softmax(a(x), 1) + torch.softmax(b(x), 1)) / 2
    assert torch.allclose(got, want, atol=1e-6)


def test_exported_ensemble_predicts_and_a_subset_is_one_fold(cv: dict, ct6_dataset: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"  # the phantom bundle as the folds were trained: the FAST network and grid,
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("runs*", "models"))  # no models/ (as planned)
    common = json.loads((bundle / "configs" / "common.json").read_text())
    common.update(features=FAST["network_def#features"], pixdim=FAST["pixdim"], roi_size=FAST["roi_size"])
    (bundle / "configs" / "common.json").write_text(json.dumps(common, indent=2))
    with pytest.raises(UsageError, match="trained with --set"):  # into the shipped bundle's grid and network
        export_ensemble(BUNDLE, cv["out"])
    from pipeline.plan_docs import UNTRAINED, status_block

    (bundle / "docs" / "README.md").write_text(f"# planned\n\n{status_block(UNTRAINED)}\n")
    exported = export_ensemble(bundle, cv["out"])
    assert [p.name for p in exported] == ["fold_0.pt", "fold_1.pt"]
    status = (bundle / "docs" / "README.md").read_text()  # no longer "no weights yet"
    assert "no weights" not in status and "**Status: the 2-fold ensemble** of `segpipe crossval`" in status
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["ensemble"]["weights"] == ["models/fold_0.pt", "models/fold_1.pt"]
    saved = json.loads((cv["out"] / "crossval.json").read_text())["postprocessing"]
    assert meta["ensemble"]["crossval"]["mean_dice_postprocessed"] == pytest.approx(saved["summary"]["mean_dice"])
    assert json.loads((bundle / "configs" / "common.json").read_text())["folds"] == [0, 1]
    studies = ct6_dataset.parent / "imagesTr"
    rows = predict(bundle, studies, tmp_path / "both", device="cpu", progress=False)
    assert all(r["status"] == "ok" for r in rows)
    predict(bundle, studies, tmp_path / "fold0", device="cpu", progress=False, overrides={"folds": [0]})
    with pytest.raises(UsageError, match=r"folds: fold 7 is not among the bundle's exported folds \[0, 1\]"):
        predict(bundle, studies, tmp_path / "bad", device="cpu", progress=False, overrides={"folds": [7]})
    for bad in (0, "0", [True]):  # folds=0 once predicted with models/model.pt (0 is falsy)
        with pytest.raises(UsageError, match=r"folds: expected a list of fold numbers|folds=0: expects a list"):
            predict(bundle, studies, tmp_path / "bad", device="cpu", progress=False, overrides={"folds": bad})
    predict(bundle, studies, tmp_path / "single", device="cpu", progress=False,  # model_path alone: that file,
            overrides={"model_path": str(cv["out"] / "fold_0" / "model.pt")})   # not the bundle's folds
    for r in rows:
        name = f"{r['study_id']}.nii.gz"
        a, b = (np.asarray(nib.load(tmp_path / d / name).dataobj) for d in ("fold0", "single"))
        np.testing.assert_array_equal(a, b)
    # a fold file of another network in the bundle: one line naming it
    other = torch.nn.Conv3d(1, 2, 3).state_dict()
    torch.save(other, bundle / "models" / "fold_1.pt")
    with pytest.raises(InputError, match=r"fold_1\.pt: weights do not fit"):
        predict(bundle, studies, tmp_path / "bad", device="cpu", progress=False)


def test_keep_largest_is_chosen_per_class_and_spares_a_label_of_two_structures(tmp_path: Path) -> None:
    """Out-of-fold masks where keep-largest helps one class (a stray blob) and would cut the other
    (a label of two separate structures, as both kidneys under one name): it is switched on for
    the first class only, and the chosen masks score perfectly."""
    from pipeline.crossval_score import SELECTED, score

    affine = np.array([[0.0, -1.5, 0, 20], [1.2, 0, 0, -7], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    ref = np.zeros((40, 32, 12), np.uint8)
    ref[4:10, 4:10, 3:8] = 1
    ref[28:34, 4:10, 3:8] = 1  # "kidneys": two structures, one label
    ref[14:24, 18:28, 2:10] = 2
    entries = []
    (tmp_path / "oof").mkdir()
    for i in range(2):
        for kind, data in (("img", ref.astype(np.float32)), ("lab", ref)):
            nib.save(nib.Nifti1Image(data, affine), tmp_path / f"{kind}_{i}.nii.gz")
        pred = ref.copy()
        pred[30 + i:33, 24:28, 1:3] = 2  # a stray blob of class 2, far from its organ
        nib.save(nib.Nifti1Image(pred, affine), tmp_path / "oof" / f"case{i}.nii.gz")
        entries.append({"image": f"img_{i}.nii.gz", "label": f"lab_{i}.nii.gz", "id": f"case{i}"})
        (tmp_path / f"fold_{i}").mkdir()  # a fold's masks count while its model is there and stamped theirs
        (tmp_path / f"fold_{i}" / "model.pt").write_bytes(b"weights")
        (tmp_path / "oof" / f".fold_{i}.model").write_text(hashlib.sha256(b"weights").hexdigest())
    manifest = tmp_path / "dataset.json"
    manifest.write_text(json.dumps({"labels": {"0": "background", "1": "kidney", "2": "liver"}, "training": entries}))

    result = score(tmp_path, manifest, [["case0"], ["case1"]], "x")
    pp = result["postprocessing"]
    assert pp["dice"]["none"]["kidney"] == pytest.approx(1.0) and pp["dice"]["none"]["liver"] < 0.99
    assert pp["dice"]["largest_per_class"]["kidney"] < 0.7  # keep-largest of every class cuts a kidney
    assert pp["chosen"] == SELECTED and pp["postprocess"] == {"keep_largest": [2]}
    assert pp["keep_largest_helps"] == ["liver"]
    assert pp["mean_dice"][SELECTED] == pytest.approx(1.0) and pp["summary"]["mean_dice"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "crossval.json").read_text())["postprocessing"]["chosen"] == SELECTED


def test_postprocessing_ties_go_to_the_classes_it_helps_and_tiny_gains_to_none() -> None:
    """Keep-largest of a class whose Dice it does not change (e.g. both kidneys under one label,
    each intact) is not chosen for it: a tie between keeping every class's largest and keeping
    only where it helps goes to the latter. A gain below 1e-6 is no gain."""
    from pipeline.crossval_score import SELECTED, choose_postprocessing

    tie = {"none": [[0.9, 0.5]], "largest_foreground": [[0.9, 0.5]], "largest_per_class": [[0.95, 0.5]]}
    assert choose_postprocessing(tie) == (SELECTED, [1])
    tiny = {"none": [[0.5, 0.5]], "largest_foreground": [[0.5000005, 0.5]], "largest_per_class": [[0.5, 0.5]]}
    assert choose_postprocessing(tiny) == ("none", [])
    foreground = {"none": [[0.5, 0.5]], "largest_foreground": [[0.7, 0.7]], "largest_per_class": [[0.6, 0.5]]}
    assert choose_postprocessing(foreground) == ("largest_foreground", [1])
    every = {"none": [[0.5, 0.5]], "largest_foreground": [[0.5, 0.5]], "largest_per_class": [[0.6, 0.6]]}
    assert choose_postprocessing(every) == (SELECTED, [1, 2])


def test_export_refuses_folds_trained_with_settings_the_bundle_lacks(cv: dict, tmp_path: Path) -> None:
    """Folds trained with --set roi_size=... exported into a bundle that says otherwise would be
    predicted with windows (or a spacing, a network) they never learnt: one line, nothing written."""
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("runs*"))
    before = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    with pytest.raises(UsageError, match=r"fold_0/trained\.json: this fold was trained with --set "  # every one
                                         r"roi_size=\[16, 16, 12\] --set network_def#features=\[8, 16, 32, 8\] "
                                         r"and .* says roi_size \[48, 48, 32\], network_def#features \[16, ") as e:
        export_ensemble(bundle, cv["out"])
    assert "fold_0/config_resolved.json: this fold was trained with another network_def" in str(e.value)
    assert str(e.value).endswith(" (folds 1 too)")  # both checks, and the other folds named: one run shows all
    assert {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before


def test_scoring_counts_only_masks_of_a_fold_model_that_is_there_and_unchanged(
        cv: dict, tmp_path: Path, ct6_dataset: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A fold folder deleted, or a fold trained again and not yet predicted: its masks are stale,
    so its cases are not scored (before, crossval.json counted them and --export then failed on
    the missing weights)."""
    from pipeline.crossval_score import score

    carried = tmp_path / "cv"
    shutil.copytree(cv["out"], carried, ignore=shutil.ignore_patterns("checkpoints", "mlflow_run.json"))
    folds = fold_cases(ct6_dataset, 2, 0)
    assert score(carried, ct6_dataset, folds, "t")["cases_scored"] == 6
    shutil.copy(carried / "fold_1" / "model.pt", carried / "fold_0" / "model.pt")  # fold 0 trained again
    shutil.rmtree(carried / "fold_1")  # fold 1 deleted
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        result = score(carried, ct6_dataset, folds, "t")
    assert result["cases_scored"] == 0 and result["cases_total"] == 6
    assert "fold 1: no model.pt" in caplog.text and "fold 0: no model.pt" not in caplog.text  # its masks: said
    (carried / "oof" / ".fold_0.model").unlink()  # unstamped masks (a run killed before its stamp): of no
    assert score(carried, ct6_dataset, folds, "t")["cases_scored"] == 0  # known model, so not scored


def test_exporting_fewer_folds_leaves_no_stale_fold_weights(cv: dict, tmp_path: Path) -> None:
    bundle = _small_bundle(tmp_path / "bundle")
    export_ensemble(bundle, cv["out"])
    assert sorted(p.name for p in (bundle / "models").glob("fold_*.pt")) == ["fold_0.pt", "fold_1.pt"]
    export_ensemble(bundle, cv["out"], folds=[1])
    assert sorted(p.name for p in (bundle / "models").glob("fold_*.pt")) == ["fold_1.pt"]
    assert json.loads((bundle / "configs" / "common.json").read_text())["folds"] == [1]
    with pytest.raises(UsageError, match=r"--fold 7: not among the cross-validation's folds 0\.\.1"):
        export_ensemble(bundle, cv["out"], folds=[0, 7])
    assert sorted(p.name for p in (bundle / "models").glob("fold_*.pt")) == ["fold_1.pt"]


# -- refusals and recoveries ----------------------------------------------------------------------------
class Trained(Exception):
    """Raised by a stand-in for train_bundle: the run got as far as training a fold."""


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.train

    def train_bundle(*args, **kwargs):
        raise Trained

    monkeypatch.setattr(pipeline.train, "train_bundle", train_bundle)


def _data_copy(tmp_path: Path, ct6_dataset: Path) -> tuple[Path, list[str]]:
    data = tmp_path / "data"
    shutil.copytree(ct6_dataset.parent, data)
    return data / "dataset.json", sorted(e["id"] for e in load_manifest(data / "dataset.json")["training"])


def _carried(cv: dict, dest: Path, checkpoints: bool = False) -> Path:
    shutil.copytree(cv["out"], dest, ignore=shutil.ignore_patterns(
        *(() if checkpoints else ("checkpoints",)), "mlflow_run.json"))
    return dest


def _mtimes(out: Path, ids: list[str]) -> dict[str, int]:
    return {s: (out / "oof" / f"{s}.nii.gz").stat().st_mtime_ns for s in ids}


def test_unstamped_masks_are_predicted_again_by_the_current_model(cv: dict, tmp_path: Path, ct6_dataset: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A fold killed while its out-of-fold masks were predicted left masks without a stamp; trained
    again since, its masks are all predicted by the new model (the stamp of the model being
    predicted is written before its first mask), and unstamped masks are never scored."""
    import pipeline.predict

    out, folds = _carried(cv, tmp_path / "cv"), fold_cases(ct6_dataset, 2, 0)
    (out / "oof" / ".fold_0.model").unlink()  # killed before the stamp was written
    shutil.copy(out / "fold_1" / "model.pt", out / "fold_0" / "model.pt")  # then trained again
    before, digest = _mtimes(out, sum(folds, [])), hashlib.sha256((out / "fold_0" / "model.pt").read_bytes()).hexdigest()
    stamps, predict_ = [], pipeline.predict.predict

    def predict(*args, **kwargs):
        stamps.append((out / "oof" / ".fold_0.model").read_text().strip())
        return predict_(*args, **kwargs)

    monkeypatch.setattr(pipeline.predict, "predict", predict)
    predict_fold(cv["bundle"], ct6_dataset, out, 0, folds[0], "cpu", SMALL)
    assert stamps == [digest]  # stamped before predicting
    after = _mtimes(out, sum(folds, []))
    assert all(after[s] != before[s] for s in folds[0]) and all(after[s] == before[s] for s in folds[1])


def test_a_splits_file_that_does_not_fit_the_run_is_one_line_and_trains_nothing(
        tmp_path: Path, ct6_dataset: Path, mlflow_store: str, no_training: None) -> None:
    """The splits file training would read (the bundle's splits_file, else splits.json beside the
    manifest) must be this run's split: a case added to the manifest since, another number of folds
    or another seed is refused naming the file, not replaced by a split computed in memory."""
    manifest, ids = _data_copy(tmp_path, ct6_dataset)
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("runs*"))
    common = json.loads((bundle / "configs/common.json").read_text())
    common["splits_file"] = "$@bundle_root + '/splits.json'"
    (bundle / "configs/common.json").write_text(json.dumps(common))
    kw = {"folds": 2, "output_dir": tmp_path / "cv", "tracking_uri": mlflow_store, "overrides": SMALL}
    planned = ids[:-1]  # planned before the last case was added to the manifest
    (bundle / "splits.json").write_text(json.dumps({"k": 2, "seed": 0, "folds": [
        {"train": planned[3:], "val": planned[:3]}, {"train": planned[:3], "val": planned[3:]}]}))
    with pytest.raises(InputError, match=rf"bundle/splits\.json: does not match .*case {ids[-1]} missing"):
        crossval(bundle, manifest, **kw)
    three = [{"train": [i for i in ids if i not in ids[k::3]], "val": ids[k::3]} for k in range(3)]
    (bundle / "splits.json").write_text(json.dumps({"k": 3, "seed": 0, "folds": three}))
    with pytest.raises(InputError, match=r"bundle/splits\.json: does not match .*it has 3 folds, not 2"):
        crossval(bundle, manifest, **kw)
    (bundle / "splits.json").unlink()  # the manifest's own, written with another seed
    (manifest.parent / "splits.json").write_text(json.dumps({"k": 2, "seed": 1, "folds": [
        {"train": ids[3:], "val": ids[:3]}, {"train": ids[:3], "val": ids[3:]}]}))
    with pytest.raises(InputError, match=r"data/splits\.json: does not match .*written with seed 1, not 0"):
        crossval(bundle, manifest, **kw)
    assert not (tmp_path / "cv").exists()


def test_a_case_no_fold_validates_or_a_fold_without_validation_cases_is_refused(
        tmp_path: Path, ct6_dataset: Path, mlflow_store: str, no_training: None) -> None:
    """Every case needs its out-of-fold prediction and every fold some validation cases: a splits
    file that leaves a case out of every fold's val list, or leaves a fold's empty, is one line
    naming it, before anything is trained; patient 0 is a patient (it once counted as none)."""
    manifest, ids = _data_copy(tmp_path, ct6_dataset)
    kw = {"output_dir": tmp_path / "cv", "tracking_uri": mlflow_store, "overrides": SMALL}
    (manifest.parent / "splits.json").write_text(json.dumps({"k": 2, "seed": 0, "folds": [
        {"train": ids[2:], "val": ids[:2]}, {"train": ids[:2] + ids[-1:], "val": ids[2:-1]}]}))
    with pytest.raises(InputError, match=rf"data/splits\.json: case {ids[-1]} in no fold's validation cases"):
        crossval(BUNDLE, manifest, folds=2, **kw)
    (manifest.parent / "splits.json").write_text(json.dumps({"k": 3, "seed": 0, "folds": [
        {"train": ids[3:], "val": ids[:3]}, {"train": ids[:3], "val": ids[3:]}, {"train": ids, "val": []}]}))
    with pytest.raises(InputError, match=r"data/splits\.json: fold 2 has no validation cases"):
        crossval(BUNDLE, manifest, folds=3, **kw)
    (manifest.parent / "splits.json").unlink()
    doc = json.loads(manifest.read_text())
    for i, e in enumerate(doc["training"]):
        e["patient"] = i // 3  # two patients: 0 and 1
    manifest.write_text(json.dumps(doc))
    with pytest.raises(UsageError, match=r"--folds 3: .* has only 2 patients"):
        crossval(BUNDLE, manifest, folds=3, **kw)
    assert not list((tmp_path / "cv").glob("fold_*"))


@pytest.mark.parametrize("error, status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_the_parent_run_ends_failed_or_killed_with_the_command(tmp_path: Path, ct6_dataset: Path, mlflow_store: str,
                                                               monkeypatch: pytest.MonkeyPatch, error: BaseException,
                                                               status: str) -> None:
    import pipeline.train

    def train_bundle(*args, **kwargs):
        raise error

    monkeypatch.setattr(pipeline.train, "train_bundle", train_bundle)
    out = tmp_path / "cv"
    with pytest.raises(type(error)):
        crossval(BUNDLE, ct6_dataset, folds=2, output_dir=out, tracking_uri=mlflow_store, overrides=SMALL)
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    assert MlflowClient(mlflow_store).get_run(run_id).info.status == status


def test_export_refuses_folds_trained_with_another_network_or_preprocessing(cv: dict, tmp_path: Path) -> None:
    """A bundle edited since its folds were trained (another activation: the weights still load;
    another intensity window) would predict with weights that mean something else there: one
    line naming the fold's config_resolved.json and the id (every id at once), nothing written."""
    for key, edit in (("network_def", lambda c: c["network_def"].update(act="elu")),
                      ("preprocessing", lambda c: c["deterministic_transforms"][-1].update(a_min=-100))):
        bundle = _small_bundle(tmp_path / key)
        common = json.loads((bundle / "configs" / "common.json").read_text())
        edit(common)
        (bundle / "configs" / "common.json").write_text(json.dumps(common, indent=2))
        before = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
        with pytest.raises(UsageError, match=rf"fold_0/config_resolved\.json: this fold was trained with another "
                                             rf"{key} than .*{key}::"):
            export_ensemble(bundle, cv["out"])
        assert {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before
    common = json.loads((bundle / "configs" / "common.json").read_text())  # both edits: both named in one line
    common["network_def"].update(act="elu")
    (bundle / "configs" / "common.json").write_text(json.dumps(common, indent=2))
    with pytest.raises(UsageError, match=r"trained with another network_def, preprocessing than .*\(network_def::.*; "
                                         r"preprocessing::"):
        export_ensemble(bundle, cv["out"])


def test_export_refuses_weights_crossval_json_did_not_score(cv: dict, tmp_path: Path) -> None:
    """A fold trained again (killed halfway: model.pt changed, its masks not predicted again) has
    weights crossval.json never scored: export refuses them, from crossval.json's record of each
    fold's model, or for an older result from the masks' stamp."""
    out, bundle = _carried(cv, tmp_path / "cv"), _small_bundle(tmp_path / "bundle")
    before = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    state = torch.load(out / "fold_0" / "model.pt", weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, out / "fold_0" / "model.pt")
    with pytest.raises(InputError, match=r"fold_0/model\.pt: not the model of fold 0 that .*crossval\.json scored"):
        export_ensemble(bundle, out)
    result = json.loads((out / "crossval.json").read_text())
    del result["model_sha256"]
    (out / "crossval.json").write_text(json.dumps(result))
    with pytest.raises(InputError, match=r"fold_0/model\.pt: not the model of fold 0"):
        export_ensemble(bundle, out)
    assert {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before
    shutil.rmtree(out / "oof")  # as the repository keeps a result: no masks, no stamps: nothing to check
    assert [p.name for p in export_ensemble(bundle, out)] == ["fold_0.pt", "fold_1.pt"]


@pytest.mark.parametrize("fail", ["copy", "rename"])
def test_a_failed_export_leaves_the_bundle_as_it_was(cv: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     fail: str) -> None:
    """The second fold's copy fails, or the rename of metadata.json after both weights are in
    place: every file of the bundle is as it was, and no temp file is left."""
    import os

    bundle = _small_bundle(tmp_path / "bundle")
    before = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    module, name, nth = (shutil, "copyfile", 2) if fail == "copy" else (os, "replace", 3)
    real, calls = getattr(module, name), []

    def flaky(*args, **kwargs):
        calls.append(args)
        if len(calls) == nth:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, flaky)
    with pytest.raises((InputError, OSError)):
        export_ensemble(bundle, cv["out"])
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before


def test_a_corrupt_fold_model_deletes_no_out_of_fold_masks(cv: dict, tmp_path: Path, ct6_dataset: Path) -> None:
    out, folds = _carried(cv, tmp_path / "cv"), fold_cases(ct6_dataset, 2, 0)
    stamp = (out / "oof" / ".fold_0.model").read_text()
    (out / "fold_0" / "model.pt").write_bytes(b"not weights")
    with pytest.raises(InputError, match=r"fold_0/model\.pt: cannot load weights"):
        predict_fold(cv["bundle"], ct6_dataset, out, 0, folds[0], "cpu", SMALL)
    assert all((out / "oof" / f"{s}.nii.gz").is_file() for s in folds[0])
    assert (out / "oof" / ".fold_0.model").read_text() == stamp


def test_a_missing_fold_model_is_written_from_its_last_checkpoint_where_that_is_it(
        cv: dict, tmp_path: Path, ct6_dataset: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """model.pt deleted, checkpoints kept: training has nothing to do. Where the last checkpoint
    holds the fold's model (model_selection "last", or its best epoch is the last) model.pt is
    written from it; else one line says how to train the fold again."""
    import pipeline.train

    out = _carried(cv, tmp_path / "cv", checkpoints=True)
    monkeypatch.setattr(pipeline.train, "train_bundle", lambda *a, **kw: {})  # "already trained: nothing to do"
    ckpt = torch.load(out / "fold_0" / "checkpoints" / "checkpoint_2.pt", weights_only=True)
    ckpt["trainer"]["best_epoch"] = 1  # "best": epoch 1's weights, which only model.pt held
    torch.save(ckpt, out / "fold_0" / "checkpoints" / "checkpoint_2.pt")
    (out / "fold_0" / "model.pt").unlink()
    kw = {"folds": 2, "fold_ids": [0], "output_dir": out, "tracking_uri": mlflow_store, "overrides": SMALL}
    with pytest.raises(InputError, match=r"fold_0/model\.pt: missing; fold 0 kept its best epoch's weights .*"
                                         r"delete .*fold_0/checkpoints and .*fold_0/trained\.json to train fold 0"):
        crossval(cv["bundle"], ct6_dataset, **kw)
    config = json.loads((out / "fold_0" / "config_resolved.json").read_text())
    (out / "fold_0" / "config_resolved.json").write_text(json.dumps({**config, "model_selection": "last"}))
    result = crossval(cv["bundle"], ct6_dataset, **kw)
    saved = torch.load(out / "fold_0" / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in ckpt["model"].items())
    assert result["cases_scored"] == result["cases_total"] == 6


def test_an_undefined_hd95_is_logged_as_nan_not_left_out(tmp_path: Path) -> None:
    """A class no case defines an HD95 for (nothing predicted anywhere) was dropped from the
    parent's metrics without a word; MLflow keeps NaN, so it is logged as NaN."""
    import math

    from pipeline.crossval_score import mlflow_metrics
    from pipeline.tracking import RunTracker

    nan = math.nan
    per_class = {"dice": {"liver": {"mean": 0.8, "sd": 0.1}, "tiny vessel": {"mean": 0.0, "sd": 0.0}},
                 "hd95_mm": {"liver": {"mean": 4.5, "sd": 1.0}, "tiny vessel": {"mean": nan, "sd": nan}},
                 "mean_dice": 0.4, "n": 3}
    unscored = {"dice": {}, "hd95_mm": {}, "mean_dice": nan, "n": 0}
    result = {"cases_scored": 3, "cases_total": 5, "summary": per_class, "per_fold": {"0": per_class, "1": unscored},
              "postprocessing": {"summary": {**per_class, "mean_dice": 0.45}}}
    metrics = mlflow_metrics(result)
    assert metrics["oof/hd95_mm_liver"] == 4.5 and math.isnan(metrics["oof/hd95_mm_tiny_vessel"])
    assert metrics["oof/mean_dice"] == 0.4 and metrics["oof/mean_dice_postprocessed"] == 0.45
    assert "oof/fold0_mean_dice" in metrics and "oof/fold1_mean_dice" not in metrics  # fold 1 not scored yet
    assert metrics["oof/cases_scored"] == 3 and metrics["oof/cases_total"] == 5
    on_disk = json.loads(json.dumps(result).replace("NaN", "null"))  # crossval.json writes NaN as null
    assert math.isnan(mlflow_metrics(on_disk)["oof/hd95_mm_tiny_vessel"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = RunTracker(uri, "cv", tmp_path / "metrics.jsonl")
    t.log_metrics(metrics, step=0)
    assert t.finish()["tracking_ok"]
    assert math.isnan(MlflowClient(uri).get_run(t.run_id).data.metrics["oof/hd95_mm_tiny_vessel"])


def test_evaluate_json_says_when_the_ensemble_is_scored_on_cases_its_members_trained_on(
        caplog: pytest.LogCaptureFixture) -> None:
    """After export-ensemble, a bundle's evaluate.json scores fold 0's validation cases, which the
    other four members trained on: said, with what to do; one fold or the single model: nothing."""
    from pipeline.bundle import load_bundle
    from pipeline.ensemble import held_out_note

    with caplog.at_level(logging.WARNING, logger="pipeline.ensemble"):
        held_out_note([0, 1, 2, 3, 4], 0, "val")
        assert "which fold(s) [1, 2, 3, 4] trained on: not a held-out figure" in caplog.text
        caplog.clear()
        for folds, role in (([0], "val"), ([], "val"), (None, "val"), ([0, 1], "test")):
            held_out_note(folds, 0, role)
        assert not caplog.text
    for name in ("hippocampus_mri_3d", "headneck_ct_oar"):  # the shipped ensembles' evaluate.json runs it first
        parser = load_bundle(BUNDLE.parent / name, ("common.json", "evaluate.json"))
        assert parser["run"][0] == "$pipeline.ensemble.held_out_note(@folds, @fold, @eval_role)"


def test_a_bundle_without_a_single_model_does_not_offer_one(tmp_path: Path) -> None:
    """hippocampus_mri_3d ships folds only (0.8.0 dropped models/model.pt): a fold it lacks is
    refused naming the folds it has, without pointing at --set folds=[], which would only fail next."""
    from pipeline.ensemble import weight_paths

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "hippocampus_mri_3d"
    assert not (bundle / "models" / "model.pt").exists()
    with pytest.raises(UsageError, match=r"fold 7 is not among the bundle's exported folds \[0, 1, 2, 3, 4\]") as e:
        weight_paths(bundle, bundle / "models" / "model.pt", [7])
    assert "folds=[]" not in str(e.value)
    (tmp_path / "models").mkdir()  # a bundle with a single model too: offered, named
    for name in ("fold_0.pt", "model.pt"):
        (tmp_path / "models" / name).write_bytes(b"")
    with pytest.raises(UsageError, match=r"exported folds \[0\].*or --set folds=\[\] for the single model \(.*model.pt\)"):
        weight_paths(tmp_path, tmp_path / "models" / "model.pt", [7])
