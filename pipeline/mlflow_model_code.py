"""The code file of segpipe's MLflow models (MLflow's "models from code"): MLflow runs it to
build the model when loading one, instead of unpickling an object."""

from mlflow.models import set_model

from pipeline.mlflow_model import BundleModel

set_model(BundleModel())
