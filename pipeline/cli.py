"""The `segpipe` command: parse arguments, call one function, map errors to exit codes.

Exit codes: 0 ok, 1 the work failed, 2 usage. Errors are one line unless --debug.
Heavy modules are imported inside each command so `segpipe --help` stays fast.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
import threading
import warnings

from pipeline import __version__
from pipeline.cli_commands import (
    cmd_crossval,
    cmd_demo,
    cmd_evaluate,
    cmd_export_ensemble,
    cmd_fingerprint,
    cmd_plan,
    cmd_predict,
    cmd_synth,
    cmd_train,
    cmd_ui,
    cmd_validate,
    cmd_weightmap,
)
from pipeline.errors import SegpipeError, Terminated, describe, wrapped_segpipe_error

log = logging.getLogger("segpipe")
TRACKING_HELP = ("MLflow store or server (default: MLFLOW_TRACKING_URI, else MLflow's default store: "
                 "./mlflow.db with MLflow 3.7 and later)")


def _manifest(value: str) -> str:
    """A manifest argument: a dataset.json, or a dataset folder that holds one (nnU-Net v2's raw
    dataset folder, an MSD task folder)."""
    from pipeline.manifest import as_manifest

    if as_manifest(value).is_dir():
        raise argparse.ArgumentTypeError(f"{value}: a folder without a dataset.json")
    return str(as_manifest(value))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="segpipe", description="3D and 2D medical image segmentation with MONAI bundles: check and plan a "
        "dataset, train and cross-validate U-Nets, predict folders of NIfTI or DICOM studies.",
        epilog="segpipe COMMAND --help for each command. Exit codes: 0 done, 1 the work failed (one line naming "
               "the file and the problem; --debug for the traceback), 2 usage, 130 Ctrl-C, 143 SIGTERM.")
    p.add_argument("--version", action="version", version=f"segpipe {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from pipeline.synthetic import CHANNEL_LAYOUTS, KINDS

    s = sub.add_parser("synth", help="write synthetic phantom studies and their dataset.json",
                       epilog="kinds: " + "; ".join(f"{k}: {v}" for k, v in KINDS.items()))
    s.add_argument("--kind", required=True, choices=list(KINDS), help="what to draw (the kinds are listed below)")
    s.add_argument("--n", type=int, default=4, help="number of studies (default 4)")
    s.add_argument("--out", required=True,
                   help="output folder: new, empty, or a previous synth of the same kind (replaced)")
    s.add_argument("--seed", type=int, default=0, help="a non-negative integer (default 0)")
    s.add_argument("--shape", type=int, nargs="+", default=None, help="volume shape (voxels; at most 512^3 in all)")
    s.add_argument("--channel-layout", choices=CHANNEL_LAYOUTS, default="4d",
                   help="mr2ch: one 4D file per case (MSD) or one file per channel (nnU-Net v2)")
    s.add_argument("--voxel-scale", type=float, default=1.0,
                   help="ct-cohort: multiply each case's drawn spacing by 1-10 (coarser, smaller volumes for tests)")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("validate", help="check every entry of a manifest (dataset.json)")
    s.add_argument("manifest", type=_manifest, help="dataset.json, or the dataset folder that holds it")
    s.add_argument("--allow-outside", action="store_true",
                   help="allow paths outside the manifest's folder")
    s.add_argument("--folds", type=int, default=0, help="also write patient-grouped k-fold splits.json")
    s.add_argument("--seed", type=int, default=0, help="seed of the --folds split (default 0)")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("fingerprint", help="check the data as validate does, then dataset statistics -> "
                                           "fingerprint.json, with pixdim/roi_size to pass as --set")
    s.add_argument("manifest", type=_manifest, help="dataset.json, or the dataset folder that holds it")
    s.add_argument("--out", default=None, help="output file (default: beside the manifest)")
    s.set_defaults(func=cmd_fingerprint)

    s = sub.add_parser("plan", help="plan a complete bundle for a dataset (fingerprint -> decisions -> configs)")
    s.add_argument("manifest", type=_manifest, help="dataset.json, or the dataset folder that holds it")
    s.add_argument("--out", required=True, help="bundle folder to create (must not exist or be empty)")
    s.add_argument("--name", default=None, help="bundle name (default: from the manifest's name)")
    s.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where it will train (default: cuda if this machine has a GPU, else cpu)")
    s.add_argument("--budget-min", type=float, default=30.0, help="training wall-time budget in minutes (30)")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("weightmap", help="render a label slice and its U-Net boundary weight map")
    s.add_argument("label", help="label NIfTI")
    s.add_argument("--out", required=True, help="PNG to write")
    s.add_argument("--w0", type=float, default=10.0, help="border weight w0 (default 10)")
    s.add_argument("--sigma", type=float, default=5.0, help="in millimetres")
    s.add_argument("--border-on", choices=["all", "background"], default="all",
                   help="the border term on every voxel (default: organs touching organs weighted too) or on background only (the paper's setting for cells)")
    s.add_argument("--slice", type=int, default=None, help="slice index along the last axis")
    s.set_defaults(func=cmd_weightmap)

    s = sub.add_parser("train", help="train a bundle")
    s.add_argument("bundle", help="bundle folder")
    s.add_argument("--manifest", type=_manifest, default=None, help="dataset.json or its folder")
    s.add_argument("--epochs", type=int, default=None, help="max_epochs (default: the bundle's)")
    s.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    s.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    s.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision: bf16 on CUDA (fp16 where it lacks bf16) and on CPUs with native bf16; "
                        "--no-amp computes in fp32 (default: the bundle's amp)")
    s.add_argument("--set", action="append", metavar="ID=VALUE", help="override a bundle id")
    s.add_argument("--verbose", action="store_true",
                   help="also Ignite's and MONAI's own log lines and the per-epoch record")
    s.add_argument("--register", action=argparse.BooleanOptionalAction, default=True,
                   help="register the trained model in MLflow under the bundle's name (default: yes)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("crossval", help="k-fold cross-validation: folds, out-of-fold Dice, post-processing")
    s.add_argument("bundle", help="bundle folder")
    s.add_argument("--manifest", type=_manifest, required=True, help="dataset.json or its folder")
    s.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    s.add_argument("--fold", type=int, action="append", help="train only this fold (repeatable)")
    s.add_argument("--epochs", type=int, default=None, help="max_epochs of each fold (default: the bundle's)")
    s.add_argument("--output", default=None, help="folder (default: the bundle's output_dir/crossval)")
    s.add_argument("--export", action="store_true", help="copy the fold weights into the bundle afterwards")
    s.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    s.add_argument("--set", action="append", metavar="ID=VALUE", help="override a bundle id")
    s.add_argument("--verbose", action="store_true", help="the trainings' full log (see train --verbose)")
    s.set_defaults(func=cmd_crossval)

    s = sub.add_parser("export-ensemble", help="copy a cross-validation's fold weights into the bundle")
    s.add_argument("bundle", help="bundle folder")
    s.add_argument("--crossval", required=True, help="the cross-validation folder (holds crossval.json)")
    s.add_argument("--fold", type=int, action="append", help="export only this fold (repeatable)")
    s.set_defaults(func=cmd_export_ensemble)

    s = sub.add_parser("predict", help="segment one study, a folder or a manifest")
    s.add_argument("bundle", help="bundle folder (weights in models/model.pt, or models/fold_<k>.pt)")
    s.add_argument("--input", required=True, help="NIfTI file, folder (NIfTI/DICOM) or manifest")
    s.add_argument("--output", required=True, help="output folder")
    s.add_argument("--shard", default=None, help="i/n: take the i-th of n deterministic shards")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    s.add_argument("--set", action="append", metavar="ID=VALUE", help="override a bundle id")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    s.add_argument("--format", choices=["nifti", "dicom-seg", "both"], default="nifti",
                   help="masks as <id>.nii.gz (default), DICOM SEG <id>.seg.dcm (DICOM series studies), or both")
    s.add_argument("--preview", action="store_true",
                   help="a PNG per study (<id>_preview.png) and OUTPUT/index.html listing every study")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("evaluate", help="Dice, HD95 and surface Dice of predicted masks")
    s.add_argument("--pred", required=True, help="folder of predicted masks")
    s.add_argument("--ref", type=_manifest, required=True, help="manifest (or its folder) with the reference labels")
    s.add_argument("--out", default=None, help="per-case CSV (default: PRED/metrics.csv)")
    s.add_argument("--run", "--run-id", dest="run_id", default=None, metavar="RUN",
                   help="also log to this MLflow run: its id, or the training's output folder "
                        "(its checkpoints/mlflow_run.json names the run and the store)")
    s.add_argument("--tracking-uri", default=None,
                   help="MLflow store or server of --run (default: the store the run's folder names, else as train)")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("demo", help="synthesise, validate, train, predict and evaluate end to end")
    s.add_argument("--out", default="demo_out", help="folder for the data, runs and masks (default demo_out)")
    s.add_argument("--epochs", type=int, default=None, help="max_epochs (default: the demo bundle's)")
    s.add_argument("--verbose", action="store_true", help="the training's full log (see train --verbose)")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("ui", help="start the MLflow UI on the project's store (prints the training view)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: all its addresses)")
    s.add_argument("--port", type=int, default=5000, help="1-65535 (default 5000)")
    s.add_argument("--tracking-uri", default=None,
                   help="the store (default: MLFLOW_TRACKING_URI, else ./mlflow.db); it must exist")
    s.add_argument("--allowed-hosts", default=None, metavar="HOSTS",
                   help="comma-separated Host names (MLflow's patterns: name, name:port, 10.*) the UI answers "
                        "to, besides localhost; default: localhost for a loopback --host, else also this "
                        "machine's names and addresses and private IPs")
    s.set_defaults(func=cmd_ui)
    return p


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not a.debug:  # library deprecation chatter is not for our users; --debug shows it
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.basicConfig(
        level=logging.DEBUG if a.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not a.debug:  # nibabel's header auto-fix notes name no file; our own checks report what matters
        logging.getLogger("nibabel.global").setLevel(logging.ERROR)
        # with pydicom installed (highdicom's dependency) MONAI's LoadImage warns on every
        # construction that an optional GPU DICOM decoder is absent; highdicom logs each copied module
        logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
        logging.getLogger("highdicom").setLevel(logging.WARNING)
        # MLflow's SQL store logs every database error with a traceback before raising it, and
        # pipeline.tracking reports that failure in one line (records kept in the run's journal)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
    # a crash below Python (SIGABRT, SIGSEGV in torch, gloo or ITK) prints where each thread was in
    # Python before the process dies: under torchrun otherwise only "Signal 6 (SIGABRT) received"
    if not faulthandler.is_enabled():
        try:
            faulthandler.enable(all_threads=True)
        except (AttributeError, ValueError, OSError, RuntimeError):  # no stderr, or one without a file descriptor
            pass
    if a.command != "ui" and threading.current_thread() is threading.main_thread():  # ui: uvicorn's own shutdown
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(a.func(a) or 0)
    except SegpipeError as e:
        if a.debug:
            raise
        print(f"segpipe {a.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except Terminated:
        print(f"segpipe {a.command}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"segpipe {a.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - last resort: one line, no traceback page
        if a.debug:
            raise
        if (ours := wrapped_segpipe_error(e)) is not None:  # ours, raised inside MONAI or Ignite
            print(f"segpipe {a.command}: error: {ours}", file=sys.stderr)
            return ours.exit_code
        print(f"segpipe {a.command}: error: {describe(e)} (rerun with --debug for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
