"""A trained bundle as an MLflow model: logged with its run, registered, loaded back to predict.

``stage_bundle`` writes a bundle folder as the training used it: the bundle's configs with the
training's overrides that inference reads baked in (a network trained with ``--set
network_def#features=[...]`` is rebuilt with those features), ``folds`` emptied and the trained
weights as ``models/model.pt``. ``log_bundle_model`` logs that folder as an MLflow pyfunc model
(``BundleModel``; the ``pipeline`` package goes with it as code, so the model predicts with the
code that trained it) and, if asked, registers it under the bundle's name.

Loading it back::

    import mlflow
    model = mlflow.pyfunc.load_model("models:/phantom_ct_3d/1")   # or runs:/<run id>/... , models:/m-...
    report = model.predict(["study.nii.gz", "folder/of/studies"], params={"output_dir": "masks"})

``predict`` takes a path, a list of paths or a one-column DataFrame of paths (NIfTI files,
folders of NIfTI/DICOM studies, or a manifest), runs ``pipeline.predict.predict`` (the bundle's
own preprocessing, inferer and post-processing) into ``params["output_dir"]`` (a new temporary
folder if not given; ``params["device"]`` picks the device) and returns the report rows as a
DataFrame: one row per study with the mask's path and the volume of each label.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow.pyfunc import PythonModel

log = logging.getLogger(__name__)

#: ids a staged bundle never takes from the training: paths of the training machine, its device
NOT_BAKED = ("bundle_root", "output_dir", "dataset_dir", "manifest", "model_path", "device", "folds",
             "prediction_dir", "datalist")
CONFIG_FILES = ("metadata.json", "common.json", "inference.json", "evaluate.json", "train.json", "logging.conf")
CODE_FILE = Path(__file__).with_name("mlflow_model_code.py")


class BundleModel(PythonModel):
    """The pyfunc model (a class because MLflow asks for one); ``mlflow_model_code.py`` makes it."""

    _skip_type_hint_validation = True  # the signature is given (paths + params); no advice on hints

    def load_context(self, context: Any) -> None:
        self.bundle = Path(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None):  # noqa: ANN001 - MLflow reads type hints as a schema
        return predict_paths(self.bundle, _paths(model_input), **(params or {}))


def _paths(model_input: Any) -> list[str]:
    if isinstance(model_input, (str, os.PathLike)):
        return [str(model_input)]
    if hasattr(model_input, "iloc"):  # a DataFrame (what pyfunc's schema check makes of a list) or Series
        frame = model_input.to_frame() if hasattr(model_input, "to_frame") and model_input.ndim == 1 else model_input
        return [str(v) for v in frame.iloc[:, 0].tolist()]
    return [str(v) for v in model_input]


def predict_paths(bundle: Path, paths: list[str], output_dir: str = "", device: str = "") -> Any:
    """Segment every study of ``paths`` with the staged ``bundle`` into ``output_dir``; the report
    rows as a DataFrame."""
    import pandas as pd

    from pipeline.predict import predict

    out = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="segpipe-mlflow-"))
    rows: list[dict[str, Any]] = []
    for path in paths:
        rows += predict(bundle, Path(path), out, device=device or None, progress=False)
    return pd.DataFrame(rows)


def inference_overrides(train_parser: Any, bundle_dir: Path) -> dict[str, Any]:
    """The top-level ids of common.json + inference.json whose raw value the training changed."""
    from pipeline.bundle import load_bundle

    fresh = load_bundle(bundle_dir, ("common.json", "inference.json"))
    out = {}
    for key in fresh.get():
        if key in NOT_BAKED or key.startswith("_") or key not in train_parser:
            continue
        if train_parser.get(key) != fresh.get(key):
            out[key] = train_parser.get(key)
    return out


def stage_bundle(bundle_dir: Path, train_parser: Any, weights: Path, dest: Path) -> Path:
    """Write the bundle as trained into ``dest`` (replacing it): configs with the training's
    inference-relevant overrides (``inference_overrides``), ``folds`` empty, ``models/model.pt``."""
    bundle_dir, dest = Path(bundle_dir), Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "configs").mkdir(parents=True)
    (dest / "models").mkdir()
    overrides = inference_overrides(train_parser, bundle_dir)
    for name in CONFIG_FILES:
        src = bundle_dir / "configs" / name
        if not src.is_file():
            continue
        if name in ("common.json", "inference.json"):
            config = json.loads(src.read_text())
            config.update({k: v for k, v in overrides.items() if k in config})
            if "folds" in config:
                config["folds"] = []
            (dest / "configs" / name).write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copyfile(src, dest / "configs" / name)
    if (bundle_dir / "LICENSE").is_file():
        shutil.copyfile(bundle_dir / "LICENSE", dest / "LICENSE")
    shutil.copyfile(weights, dest / "models" / "model.pt")
    (dest / "configs" / "trained_overrides.json").write_text(json.dumps(overrides, indent=2, default=str) + "\n")
    return dest


def requirements() -> list[str]:
    """segpipe's own dependencies pinned to the versions installed here."""
    out = []
    for req in metadata.requires("segpipe") or []:
        if "extra ==" in req:
            continue
        name = req.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip()
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(req.split(";")[0].strip())
    return out


@contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's model logging reads the global tracking URI: set it for the block, then put back
    both the global and ``MLFLOW_TRACKING_URI`` (MLflow's own helper unsets the variable); no
    artifact progress bars meanwhile."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # no download bars in a training's log
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def log_bundle_model(uri: str, run_id: str, folder: Path, name: str, register: bool, description: str = "") -> Any:
    """Log the staged bundle ``folder`` as an MLflow model of run ``run_id`` (named ``name``);
    with ``register`` also as a new version of the registered model ``name``, described by
    ``description``. Returns MLflow's ``ModelInfo``."""
    import mlflow
    from mlflow.models import infer_signature

    signature = infer_signature(["study.nii.gz"], params={"output_dir": "", "device": ""})
    # the fluent run: MLflow 3 puts a logged model in the experiment of the active run; its advice
    # on type hints and input examples (a list of paths says nothing more) is not for our users
    said = io.StringIO()  # MLflow prints "Successfully registered model ..." raw to stderr: our line below says it
    try:
        with _tracking_uri(uri), mlflow.start_run(run_id=run_id, log_system_metrics=False), \
                warnings.catch_warnings(), contextlib.redirect_stderr(said):
            warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\.")
            info = mlflow.pyfunc.log_model(name=name, python_model=str(CODE_FILE), artifacts={"bundle": str(folder)},
                                           code_paths=[str(Path(__file__).parent)], pip_requirements=requirements(),
                                           signature=signature, registered_model_name=name if register else None)
    finally:  # kept for --verbose (debug), and beside a failure's own message
        if said.getvalue().strip():
            log.debug("MLflow said: %s", said.getvalue().strip())
    if register and description:
        from mlflow.tracking import MlflowClient

        MlflowClient(uri).update_model_version(name, info.registered_model_version, description=description)
    log.info("MLflow: model %s logged%s", info.model_uri,
             f", registered as {name} version {info.registered_model_version}" if register else "")
    return info
