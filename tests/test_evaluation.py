"""Evaluation: analytic Dice/HD95/NSD, CSV + summary on disk, missing and mismatched cases, MLflow, CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import InputError
from pipeline.evaluation import case_metrics, evaluate
from pipeline.fileio import write_nifti

SPACING = (2.0, 1.0, 0.5)  # mm along array axes 0, 1, 2
# non-identity, axis-permuting affine with those voxel sizes (columns: axis 0 -> -y, 1 -> z, 2 -> x)
AFFINE = np.array([[0.0, 0.0, 0.5, 10.0], [-2.0, 0.0, 0.0, 20.0], [0.0, 1.0, 0.0, -5.0], [0, 0, 0, 1]])
LABELS = {"0": "background", "1": "organ", "2": "lesion"}


def cube(shift: tuple[int, int, int] = (0, 0, 0), shape=(12, 12, 12), value: int = 1) -> np.ndarray:
    """A 6x6x6 voxel cube at [2:8]^3, shifted by ``shift`` voxels."""
    a = np.zeros(shape, np.uint8)
    a[tuple(slice(2 + s, 8 + s) for s in shift)] = value
    return a


def test_shifted_cubes_by_hand():
    # 6^3 cubes overlapping in 4x6x6 voxels: Dice = 2*144/(216+216) = 2/3.
    # Shift of 2 voxels along axis 0 (2 mm): the shifted-out face (36 of the 152 surface voxels,
    # > 5 %) lies 2 voxels = 4 mm from the other cube's face, and no surface voxel is farther,
    # so HD95 = 4 mm. Along axis 2 (0.5 mm) the same shift is 1 mm.
    m = case_metrics(cube((2, 0, 0)), cube(), SPACING, LABELS, tolerance_mm=1.0)
    assert m["organ"]["dice"] == pytest.approx(2 / 3, abs=1e-6)
    assert m["organ"]["hd95_mm"] == pytest.approx(4.0)
    assert case_metrics(cube((0, 0, 2)), cube(), SPACING, LABELS)["organ"]["hd95_mm"] == pytest.approx(1.0)
    # NSD at tolerance 0: surface voxels on both surfaces: the side ring (4*6-4 = 20 voxels) over the
    # 4 overlapping slices = 80 of 152 per direction.
    assert case_metrics(cube((2, 0, 0)), cube(), SPACING, LABELS, 0.0)["organ"]["surface_dice"] == pytest.approx(
        80 / 152, abs=1e-6)
    # at 1 mm also the 4x4 interior of the inner face, each within 0.5-1 mm (axis 2) of the side faces
    assert m["organ"]["surface_dice"] == pytest.approx(96 / 152, abs=1e-6)
    assert case_metrics(cube((2, 0, 0)), cube(), SPACING, LABELS, 4.0)["organ"]["surface_dice"] == 1.0


def test_empty_classes():
    m = case_metrics(cube(), cube(), SPACING, LABELS)
    assert m["organ"] == {"ref_voxels": 216, "pred_voxels": 216, "dice": 1.0, "hd95_mm": 0.0, "surface_dice": 1.0}
    assert (m["lesion"]["dice"], m["lesion"]["hd95_mm"], m["lesion"]["surface_dice"]) == (1.0, 0.0, 1.0)
    missed = case_metrics(np.zeros((12, 12, 12), int), cube(), SPACING, LABELS)["organ"]
    assert missed["dice"] == 0.0 and math.isnan(missed["hd95_mm"]) and missed["surface_dice"] == 0.0
    assert missed["pred_voxels"] == 0


def _dataset(root: Path, n: int = 4) -> Path:
    """n reference label maps (a cube, with a lesion in the first) and their dataset.json."""
    (root / "labelsTr").mkdir(parents=True)
    (root / "imagesTr").mkdir()
    entries = []
    for i in range(n):
        ref = cube()
        if i == 0:
            ref[9:11, 9:11, 9:11] = 2
        write_nifti(ref, root / "labelsTr" / f"case_{i}.nii.gz", affine=AFFINE)
        write_nifti(ref.astype(np.int16) * 50, root / "imagesTr" / f"case_{i}.nii.gz", affine=AFFINE)
        entries.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    manifest = {"name": "cubes", "modality": {"0": "CT"}, "labels": LABELS, "numTraining": n, "training": entries}
    (root / "dataset.json").write_text(json.dumps(manifest))
    return root / "dataset.json"


@pytest.fixture
def evaluated(tmp_path: Path):
    """case_0 perfect, case_1 shifted 2 voxels along axis 0, case_2 missing, case_3 wrong affine."""
    manifest = _dataset(tmp_path / "ref")
    pred = tmp_path / "pred"
    pred.mkdir()
    perfect = cube()
    perfect[9:11, 9:11, 9:11] = 2
    write_nifti(perfect, pred / "case_0.nii.gz", affine=AFFINE)
    write_nifti(cube((2, 0, 0)), pred / "case_1.nii.gz", affine=AFFINE)
    moved = AFFINE.copy()
    moved[0, 3] += 5.0
    write_nifti(cube(), pred / "case_3.nii.gz", affine=moved)
    write_nifti(cube(), pred / "stray.nii.gz", affine=AFFINE)
    return manifest, pred


def test_evaluate_csv_summary_missing_and_mismatch(evaluated):
    manifest, pred = evaluated
    summary = evaluate(pred, manifest)
    rows = list(csv.DictReader((pred / "metrics.csv").open()))
    by = {(r["study_id"], r["class"]): r for r in rows}
    assert float(by["case_0", "organ"]["dice"]) == 1.0 and float(by["case_0", "lesion"]["dice"]) == 1.0
    assert float(by["case_1", "organ"]["dice"]) == pytest.approx(2 / 3)
    assert float(by["case_1", "organ"]["hd95_mm"]) == pytest.approx(4.0)
    assert by["case_1", "lesion"]["dice"] == "1.0"  # absent in both: agreement
    assert "missing prediction" in by["case_2", ""]["error"]
    assert "affine differs" in by["case_3", ""]["error"] and "case_3.nii.gz" in by["case_3", ""]["error"]

    on_disk = json.loads((pred / "metrics_summary.json").read_text())
    assert on_disk["missing"] == summary["missing"] == ["case_2"]
    assert list(on_disk["errors"]) == ["case_3"] and on_disk["extra_predictions"] == ["stray"]
    assert on_disk["n_cases"] == 2 and on_disk["n_reference"] == 4
    organ = on_disk["per_class"]["organ"]
    assert organ["dice_mean"] == pytest.approx((1 + 2 / 3) / 2)
    assert organ["dice_median"] == pytest.approx((1 + 2 / 3) / 2)
    assert organ["dice_std"] == pytest.approx(1 / 6)
    assert organ["hd95_mean"] == pytest.approx(2.0) and organ["n"] == 2
    assert on_disk["per_class"]["lesion"]["n_both_empty"] == 1
    assert summary["mean_dice"] == pytest.approx(((1 + 2 / 3) / 2 + 1.0) / 2)


def test_geometry_shape_mismatch_and_nothing_to_evaluate(tmp_path: Path):
    manifest = _dataset(tmp_path / "ref", n=2)
    pred = tmp_path / "pred"
    pred.mkdir()
    write_nifti(cube(shape=(12, 12, 13)), pred / "case_0.nii.gz", affine=AFFINE)
    write_nifti(cube(), pred / "case_1.nii.gz", affine=AFFINE)
    summary = evaluate(pred, manifest, out_csv=tmp_path / "out" / "m.csv")
    assert "shape (12, 12, 13) differs" in summary["errors"]["case_0"]
    assert (tmp_path / "out" / "metrics_summary.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="none of the 2 studies"):
        evaluate(empty, manifest)
    write_nifti(cube(shape=(12, 12, 13)), pred / "case_1.nii.gz", affine=AFFINE)  # now no case can be compared
    with pytest.raises(InputError, match=r"none of the 2 studies .* could be compared \(2 refused, 0 missing; "
                                         r"e\.g\. .*shape \(12, 12, 13\) differs"):
        evaluate(pred, manifest, out_csv=tmp_path / "out2" / "m.csv")
    assert not (tmp_path / "out2").exists()


def test_mlflow_logging_read_back(evaluated, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("eval", artifact_location=(tmp_path / "art").as_uri()))
    manifest, pred = evaluated
    evaluate(pred, manifest, run_id=run.info.run_id, tracking_uri=uri)
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics["eval/dice_organ"] == pytest.approx((1 + 2 / 3) / 2)
    assert metrics["eval/hd95_organ"] == pytest.approx(2.0)
    assert metrics["eval/nsd_lesion"] == 1.0 and "eval/mean_dice" in metrics
    names = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert names == {"evaluation/metrics.csv", "evaluation/metrics_summary.json", "evaluation/metrics_summary.png"}
    with pytest.raises(InputError, match="not found"):  # before anything is written
        evaluate(pred, manifest, out_csv=tmp_path / "bad" / "m.csv", run_id="0" * 32, tracking_uri=uri)
    assert not (tmp_path / "bad").exists()


def test_cli_exit_codes(evaluated, tmp_path: Path, capsys: pytest.CaptureFixture):
    """In-process: ``main`` returns the exit code that ``python -m pipeline`` exits with
    (test_cli.py checks that mapping in a real process)."""
    from pipeline.cli import main

    manifest, pred = evaluated
    cmd = ["evaluate", "--ref", str(manifest)]
    # case_3 cannot be compared (its affine): the others are scored and written, and the run exits 1, as predict
    assert main(cmd + ["--pred", str(pred), "--out", str(tmp_path / "m.csv")]) == 1
    out, err = capsys.readouterr()
    printed = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON: {c}"))
    assert printed["missing"] == ["case_2"] and printed["n_cases"] == 2 and (tmp_path / "m.csv").is_file()
    assert len(err.strip().splitlines()) == 1 and "1 of 4 studies could not be compared" in err
    assert "case_3" in err and "affine differs" in err and str(tmp_path / "m.csv") in err
    (pred / "case_3.nii.gz").unlink()  # a missing prediction alone is a warning: exit 0
    assert main(cmd + ["--pred", str(pred), "--out", str(tmp_path / "m.csv")]) == 0
    assert json.loads(capsys.readouterr().out)["missing"] == ["case_2", "case_3"]
    with pytest.MonkeyPatch.context() as mp:  # an undefined HD95 (no class found anywhere) prints as null
        import pipeline.evaluation

        mp.setattr(pipeline.evaluation, "evaluate", lambda *args, **kw: {"mean_hd95_mm": float("nan")})
        assert main(cmd + ["--pred", str(pred)]) == 0
    printed = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-standard JSON: {c}"))
    assert printed == {"mean_hd95_mm": None}
    assert main(cmd + ["--pred", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert "prediction folder not found" in err and len(err.strip().splitlines()) == 1


def _reoriented(labels: np.ndarray, ornt: list[list[int]], path: Path, affine: np.ndarray = AFFINE) -> Path:
    """``labels`` (on ``affine``'s grid) stored in another voxel order, its affine mapping every
    voxel to the same world position (nibabel's ``as_reoriented``)."""
    import nibabel as nib

    img = nib.Nifti1Image(labels.astype(np.uint8), affine).as_reoriented(np.array(ornt))
    nib.save(img, str(path))
    return path


def test_a_mask_in_another_orientation_of_the_reference_grid_is_reoriented(tmp_path: Path):
    """The reference's grid stored flipped (LPS vs RAS) or with permuted axes is the same mask:
    compared in the reference's voxel order (before, refused as an affine mismatch)."""
    import nibabel as nib

    manifest = _dataset(tmp_path / "ref", n=3)
    pred = tmp_path / "pred"
    pred.mkdir()
    perfect = cube()
    perfect[9:11, 9:11, 9:11] = 2
    flipped = _reoriented(perfect, [[0, -1], [1, -1], [2, 1]], pred / "case_0.nii.gz")
    permuted = _reoriented(cube((2, 0, 0)), [[2, 1], [0, -1], [1, 1]], pred / "case_1.nii.gz")
    assert nib.aff2axcodes(nib.load(str(flipped)).affine) != nib.aff2axcodes(AFFINE)
    assert nib.aff2axcodes(nib.load(str(permuted)).affine) != nib.aff2axcodes(AFFINE)
    moved = AFFINE.copy()
    moved[0, 3] += 5.0  # another grid: refused, saying the orientation differs too
    _reoriented(cube(), [[0, -1], [1, 1], [2, 1]], pred / "case_2.nii.gz", affine=moved)

    summary = evaluate(pred, manifest)
    by = {(r["study_id"], r["class"]): r for r in csv.DictReader((pred / "metrics.csv").open())}
    assert float(by["case_0", "organ"]["dice"]) == 1.0 and float(by["case_0", "lesion"]["dice"]) == 1.0
    # the shift along the reference's axis 0 (2 mm voxels): as in test_shifted_cubes_by_hand
    assert float(by["case_1", "organ"]["dice"]) == pytest.approx(2 / 3)
    assert float(by["case_1", "organ"]["hd95_mm"]) == pytest.approx(4.0)
    assert list(summary["errors"]) == ["case_2"] and summary["n_cases"] == 2
    error = summary["errors"]["case_2"]
    assert "case_2.nii.gz" in error and "orientation" in error and "affine differs" in error and "\n" not in error


@pytest.mark.parametrize("shape", [(4, 5, 6), (5, 7)])
def test_to_reference_grid_undoes_any_flip_and_permutation(shape: tuple[int, ...]):
    import itertools

    import nibabel as nib

    from pipeline.evaluation import to_reference_grid

    ref = np.random.default_rng(0).integers(0, 3, shape).astype(np.uint8)
    img = nib.Nifti1Image(ref.reshape(shape + (1,) * (3 - len(shape))), AFFINE)  # a 2D map: one slice
    for axes in itertools.permutations(range(3)):
        for flips in itertools.product((1, -1), repeat=3):
            other = img.as_reoriented(np.array([[a, f] for a, f in zip(axes, flips, strict=True)]))
            data = np.asarray(other.dataobj)
            while data.ndim > 2 and data.shape[-1] == 1:  # as pipeline.fileio.read_label reads it
                data = data[..., 0]
            out = to_reference_grid(data, other.affine, ref.shape, AFFINE, 1e-3, "p.nii.gz", "r.nii.gz")
            assert out.shape == ref.shape and np.array_equal(out, ref), (axes, flips)


def test_extra_predictions_count_masks_only(tmp_path: Path):
    """``extra_predictions`` lists masks without a reference: not the probabilities that
    ``segpipe predict`` writes beside masks (``<id>_probs.nii.gz``), nor a run's hidden temp files."""
    manifest = _dataset(tmp_path / "ref", n=2)
    pred = tmp_path / "pred"
    pred.mkdir()
    probs = np.zeros((12, 12, 12, 3), np.float32)
    for sid in ("case_0", "case_1", "stray"):
        write_nifti(cube(), pred / f"{sid}.nii.gz", affine=AFFINE)
        write_nifti(probs, pred / f"{sid}_probs.nii.gz", affine=AFFINE)
    write_nifti(cube(), pred / ".tmp-1.0badf00d-late.nii.gz", affine=AFFINE)
    summary = evaluate(pred, manifest)
    assert summary["extra_predictions"] == ["stray"]
    assert not summary["errors"] and summary["n_cases"] == 2


def test_summary_plot_legend_hides_no_value_and_states_the_surface_dice_tolerance(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch):
    """The legend sat in the lower right, over the last class's value labels, and said "surface
    Dice" without its tolerance."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pipeline.progress import plot_evaluation

    drawn: list[Figure] = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(self), savefig(self, *a, **k))[1])
    per_class = {name: {"dice_mean": d, "nsd_mean": s, "hd95_mean": h} for name, d, s, h in
                 (("liver", 0.95, 0.98, 4.2), ("kidney", 1.0, 1.0, math.nan), ("spleen", 0.005, 0.33, 40.0),
                  ("pancreas", 0.6, 0.93, 12.0))}
    out = plot_evaluation({"per_class": per_class, "mean_dice": 0.64, "n_cases": 5, "tolerance_mm": 1.0},
                          tmp_path / "metrics_summary.png")
    assert out.is_file()
    (fig,) = drawn
    canvas = FigureCanvasAgg(fig)  # as drawn into the PNG
    canvas.draw()
    renderer = canvas.get_renderer()
    legends = [a.get_legend() for a in fig.axes if a.get_legend()] + list(fig.legends)
    assert len(legends) == 1
    box = legends[0].get_window_extent(renderer)
    values = [t for ax in fig.axes for t in ax.texts]  # bar_label's value labels
    assert len(values) >= 3 * len(per_class) - 1
    for text in values:
        assert not box.overlaps(text.get_window_extent(renderer)), text.get_text()
    for ax in fig.axes:
        for patch in ax.patches:  # nor a bar
            assert not box.overlaps(patch.get_window_extent(renderer))
        for tick in ax.get_xticklabels():
            assert not tick.get_text() or not box.overlaps(tick.get_window_extent(renderer)), tick.get_text()
    assert any("1 mm" in t.get_text() for t in legends[0].get_texts())
