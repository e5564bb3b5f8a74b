"""Training on ``monai.engines``: ``train_bundle`` runs a bundle's ``train#trainer`` with what a
long run needs added around it.

The bundle (common.json + train.json) defines a standard MONAI workflow (``train#trainer``,
``train#handlers``, ``validate#evaluator``, ``validate#handlers``, ``initialize``, ``run``,
``finalize``), so ``python -m monai.bundle run --config_file "['configs/common.json',
'configs/train.json']" --bundle_root B --dataset_dir D [--tracking mlflow]`` trains and validates
it as plain MONAI. ``train_bundle`` (``segpipe train``) adds, programmatically:

- the manifest validated first (``pipeline.manifest.validate``), the process group when started
  by ``torchrun`` (gloo on CPU, nccl on GPU; ``DistributedSampler`` in ``pipeline.data.loader``);
- atomic checkpoints every ``checkpoint_interval`` epochs and ``--resume`` (``pipeline.checkpoints``);
- the best weights by validation mean Dice as ``output_dir/model.pt`` (plain state_dict); copy it
  into the bundle's ``models/`` with ``--set export=true`` or ``export_model`` once you accept it;
- a stop on a non-finite loss naming epoch and iteration; gradient clipping (``grad_clip_norm``);
  early stopping (``early_stop_patience`` > 0); validation after the last epoch;
- per-epoch timing, samples/s, voxels/s and data-wait fraction; Dice per class, the per-case CSV
  and QC overlays (``pipeline.qc``); MLflow tracking on rank 0 (``pipeline.tracking``).

AMP: one ``amp`` switch. CUDA: bf16 autocast where the GPU has it, else fp16 with MONAI's
GradScaler. CPU: bf16 autocast only on CPUs with native bf16 (AVX512-BF16 or AMX), fp32 otherwise
(the ``amp_dtype`` id can force a dtype, e.g. ``--set 'amp_dtype=$torch.bfloat16'``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.handlers import EarlyStopHandler, stopping_fn_from_metric
from monai.inferers import Inferer

from pipeline import checkpoints
from pipeline.bundle import bundle_metadata, get, load_bundle
from pipeline.errors import InputError, UsageError
from pipeline.handlers import (
    attach_epoch_log,
    attach_grad_clip,
    attach_time_budget,
    attach_validation,
    attach_weight_average,
)
from pipeline.inference import cpu_has_bf16

log = logging.getLogger(__name__)


# -- AMP and compile ----------------------------------------------------------------------------
def amp_dtype(device: torch.device | str, amp: bool) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``, or None for fp32; the choice is logged."""
    device = torch.device(device)
    if not amp:
        return None
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        log.info("AMP on %s: %s autocast%s", device, dtype, " with grad scaling" if dtype == torch.float16 else "")
        return dtype
    if device.type == "cpu" and cpu_has_bf16():
        log.info("AMP on CPU: bf16 autocast (native bf16 instructions)")
        return torch.bfloat16
    log.info("AMP requested but %s has no native bf16 (AVX512-BF16/AMX): training in fp32", device)
    return None


def cuda_amp(device: torch.device | str, dtype: torch.dtype | None) -> bool:
    """Whether MONAI's own AMP (CUDA autocast + GradScaler) is on."""
    return dtype is not None and torch.device(device).type == "cuda"


class _AutocastInferer(Inferer):
    def __init__(self, inferer: Inferer, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.inferer, self.device_type, self.dtype = inferer, device_type, dtype

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.inferer(inputs, network, *args, **kwargs)
        return out.float() if torch.is_tensor(out) and out.is_floating_point() else out


def autocast_inferer(inferer: Inferer, device: torch.device | str, dtype: torch.dtype | None) -> Inferer:
    """``inferer`` under CPU autocast when ``dtype`` is set on a CPU device (MONAI's engines
    autocast only on CUDA); unchanged otherwise."""
    if dtype is None or torch.device(device).type != "cpu":
        return inferer
    return _AutocastInferer(inferer, "cpu", dtype)


def channels_last(network: torch.nn.Module, spatial_dims: int, enabled: bool = True) -> torch.nn.Module:
    """``network`` with channels-last weights (in place): several times faster 3D convolutions on
    CPU (oneDNN) and faster AMP convolutions on GPU; state_dicts load either way."""
    if enabled:
        network.to(memory_format=torch.channels_last_3d if spatial_dims == 3 else torch.channels_last)
    return network


def check_compile(trainer: Engine) -> None:
    """``compile`` on a CPU makes torch.compile generate C++: without a compiler that fails at the
    first iteration with a long traceback, so say so up front, with the fix."""
    if not getattr(trainer, "compile", False) or torch.device(trainer.state.device).type != "cpu":
        return
    if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        raise UsageError("compile: torch.compile on a CPU needs a C++ compiler (g++ or clang++, or $CXX); "
                         "install one or add --set compile=false")


# -- the entry point ------------------------------------------------------------------------------
def _overrides(manifest: Path | None, epochs: int | None, device: str | None, amp: bool | None,
               extra: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(extra or {})
    if manifest is not None:
        out["manifest"] = str(Path(manifest).resolve())
    if epochs is not None:
        out["max_epochs"] = int(epochs)
    if device is not None:
        try:
            torch.device(device)
        except RuntimeError:
            raise UsageError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:1)") from None
        out["device"] = f"$torch.device('{device}')"
    if amp is not None:
        out["amp"] = bool(amp)
    return out


def _init_distributed() -> bool:
    """Join the process group ``torchrun`` describes (nccl with GPUs, gloo without)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or idist.get_world_size() > 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    idist.initialize(backend)
    log.info("distributed: rank %d of %d (%s)", idist.get_rank(), idist.get_world_size(), backend)
    return True


def _check_manifest(manifest: Path) -> None:
    from pipeline.manifest import validate

    problems = validate(Path(manifest))
    if problems:
        for p in problems:
            log.error("%s", p)
        raise InputError(f"{manifest}: failed validation with {len(problems)} problem(s), first: {problems[0]}")


def train_bundle(bundle_dir: Path, manifest: Path | None = None, epochs: int | None = None, resume: bool = False,
                 tracking_uri: str | None = None, device: str | None = None, amp: bool | None = None,
                 overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the bundle in ``bundle_dir``; return a summary (best Dice, per class, paths, run id)."""
    t0 = time.perf_counter()
    started = _init_distributed()
    try:
        if started and device is None and torch.cuda.is_available():
            device = f"cuda:{idist.get_local_rank()}"
        parser = load_bundle(bundle_dir, ("common.json", "train.json"),
                             _overrides(manifest, epochs, device, amp, overrides))
        _check_manifest(Path(parser.get_parsed_content("manifest")))
        summary = _run(parser, Path(bundle_dir), resume=resume, tracking_uri=tracking_uri)
        summary["wall_s"] = round(time.perf_counter() - t0, 1)
        return summary
    finally:
        if started:
            idist.finalize()


def _prepare_output(output_dir: Path, ckpt_dir: Path, resume: bool) -> None:
    if idist.get_rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        old = checkpoints.list_checkpoints(ckpt_dir)
        if old and not resume:
            log.warning("%s: starting afresh (no --resume): removing %d old checkpoint(s)", ckpt_dir, len(old))
            for _, path in old:
                path.unlink()
    idist.barrier()


def _run(parser: Any, bundle_dir: Path, resume: bool, tracking_uri: str | None) -> dict[str, Any]:
    from pipeline.tracking import attach_tracker, bundle_params, git_commit, open_tracker

    meta = bundle_metadata(bundle_dir)
    output_dir = Path(parser.get_parsed_content("output_dir")).resolve()
    ckpt_dir = output_dir / "checkpoints"
    _prepare_output(output_dir, ckpt_dir, resume)
    parser.get_parsed_content("initialize")
    network = get(parser, "network", bundle_dir)
    trainer = get(parser, "train#trainer", bundle_dir)
    check_compile(trainer)
    evaluator = get(parser, "validate#evaluator", bundle_dir)
    optimizer, max_epochs = get(parser, "optimizer", bundle_dir), int(parser.get_parsed_content("max_epochs"))
    objects = {"model": network, "optimizer": optimizer, "lr_scheduler": get(parser, "lr_scheduler", bundle_dir),
               "trainer": trainer}
    if trainer.amp:  # MONAI makes a new GradScaler in run(); use one that checkpoints hold
        objects["scaler"] = scaler = torch.amp.GradScaler("cuda")
        trainer.add_event_handler(Events.STARTED, lambda e: setattr(e, "scaler", scaler))
    label_names = list(parser.get_parsed_content("label_names"))
    attach_validation(trainer, evaluator, network, label_names, output_dir, int(parser["val_interval"]),
                      int(parser.get("qc_cases", 3)), str(parser.get("model_selection", "best")))
    attach_epoch_log(trainer, optimizer, math.prod(parser.get_parsed_content("roi_size")), ckpt_dir)
    attach_grad_clip(trainer, parser.get("grad_clip_norm"))
    attach_time_budget(trainer, optimizer, float(parser.get("time_budget_min", 0) or 0))
    averaged = attach_weight_average(trainer, network, float(parser.get("ema_decay", 0) or 0), output_dir / "model_ema.pt")
    if averaged is not None:
        objects["ema"] = averaged
    if int(parser.get("early_stop_patience", 0) or 0) > 0:  # here: a bundle handler would be a circular reference
        EarlyStopHandler(int(parser["early_stop_patience"]), stopping_fn_from_metric("val_mean_dice"),
                         trainer=trainer).attach(evaluator)
    if resume:
        last = checkpoints.latest_checkpoint(ckpt_dir)
        if last is None:
            log.warning("--resume: no checkpoint in %s; starting from epoch 0", ckpt_dir)
        else:
            checkpoints.resume(last, objects, trainer, max_epochs)
    checkpoints.attach_checkpointing(trainer, objects, ckpt_dir, int(parser.get("checkpoint_interval", 1)))

    tracker = None
    if idist.get_rank() == 0:
        tracker = open_tracker(tracking_uri, meta.get("name", bundle_dir.name), output_dir / "metrics.jsonl",
                               ckpt_dir / "mlflow_run.json", resume,
                               run_name=f"{output_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        manifest = Path(parser.get_parsed_content("manifest"))
        tracker.set_tags({"bundle": meta.get("name"), "bundle_version": meta.get("version"),
                          "git_commit": git_commit(), "manifest": str(manifest), "manifest_sha256": manifest_hash(manifest),
                          "device": str(trainer.state.device), "world_size": idist.get_world_size()})
        tracker.log_params(bundle_params(parser))
        config_path = output_dir / "config_resolved.json"
        parser.export_config_file(parser.get(), str(config_path), indent=2)
        tracker.log_artifact(config_path, "config")
        attach_tracker(tracker, trainer)

    if trainer.state.epoch >= max_epochs:
        log.info("already trained to epoch %d of %d: nothing to do", trainer.state.epoch, max_epochs)
    else:
        try:
            trainer.run()
        except BaseException as e:
            if tracker is not None:
                tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
    parser.get_parsed_content("finalize")
    return _summary(parser, meta, trainer, output_dir, ckpt_dir, tracker, bundle_dir)


def _summary(parser: Any, meta: dict, trainer: Engine, output_dir: Path, ckpt_dir: Path, tracker: Any,
             bundle_dir: Path) -> dict[str, Any]:
    model = output_dir / "model.pt"
    summary: dict[str, Any] = {
        "bundle": meta.get("name"), "version": meta.get("version"), "epochs": trainer.state.epoch,
        "best_val_mean_dice": trainer.state.best_val_mean_dice, "best_epoch": trainer.state.best_epoch,
        "val_dice": trainer.state.best_val_dice,
        "output_dir": str(output_dir), "model_path": str(model) if model.is_file() else None,
        "checkpoint": str(checkpoints.latest_checkpoint(ckpt_dir)), "world_size": idist.get_world_size(),
        "device": str(trainer.state.device)}
    if tracker is not None:
        ema = [(output_dir / "model_ema.pt", "model")] if float(parser.get("ema_decay", 0) or 0) else []  # not a stale one
        for path, where in [(model, "model"), *ema, (output_dir / "val_cases.csv", "validation"),
                            *[(p, "qc") for p in sorted((output_dir / "qc").glob("*.png"))]]:
            if path.is_file():
                tracker.log_artifact(path, where)
        summary.update(tracker.finish())
    if parser.get("export") and summary["model_path"] and idist.get_rank() == 0:
        summary["exported"] = str(export_model(model, bundle_dir))
    return summary


def manifest_hash(manifest: Path) -> str:
    return hashlib.sha256(Path(manifest).read_bytes()).hexdigest()[:16]


def export_model(model_path: Path, bundle_dir: Path) -> Path:
    """Copy trained weights into the bundle's ``models/model.pt`` (the explicit export step)."""
    dest = Path(bundle_dir) / "models" / "model.pt"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_path, dest)
    log.info("exported %s -> %s", model_path, dest)
    return dest
