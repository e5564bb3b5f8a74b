"""The workflow configs of a planned bundle, as pure functions of its plan (``pipeline.plan.make_plan``):
``bundle_configs(plan, dataset_dir, manifest_name)`` -> ``{"common.json": ..., "train.json": ...,
"inference.json": ..., "evaluate.json": ...}``, in the conventions of the shipped bundles (DynUNet,
the boundary-weighted loss, the overlap-tile predictor, every id ``segpipe train``/``predict`` read
declared). ``pipeline.plan_bundle`` writes them.
"""

from __future__ import annotations

from typing import Any

TARGET_PREFIX = {"OverlapTileInferer": "pipeline.inference.", "SliceTileInferer": "pipeline.slice_inference."}


def _inferer(plan: dict[str, Any], **ids: str) -> dict[str, Any]:
    """The plan's inferer as a config block over ``ids`` (``roi_size`` and the like: references)."""
    kind = plan["inference"]["inferer"]
    block = {"_target_": TARGET_PREFIX[kind] + kind, "roi_size": "@roi_size", **ids}
    if plan["slice_axis"] is not None:
        block["slice_axis"] = "@slice_axis"
    return block


def common_config(plan: dict[str, Any], dataset_dir: str, manifest_name: str) -> dict[str, Any]:
    """common.json: paths, the contract's ids, network, deterministic transforms and the inferer."""
    net, inf, slices = plan["network"], plan["inference"], plan["slice_axis"] is not None
    imports = ["$import torch", "$import monai", "$import pipeline", "$import pipeline.networks",
               "$import pipeline.manifest", "$import pipeline.inference", "$import pipeline.ensemble"]
    return {
        "imports": imports + (["$import pipeline.slice_inference"] if slices else []),
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/runs'",
        "dataset_dir": f"$@bundle_root + {'/' + dataset_dir!r}",  # repr: a folder named o'brien stays a string
        "manifest": f"$@dataset_dir + {'/' + manifest_name!r}",
        "splits_file": "$@bundle_root + '/splits.json'",
        "model_path": "$@bundle_root + '/models/model.pt'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "amp": plan["schedule"]["amp"],
        "seed": 0,
        "fold": 0,
        "num_folds": plan["schedule"]["num_folds"],
        "spatial_dims": plan["spatial_dims"],
        **({"slice_axis": plan["slice_axis"]} if slices else {}),
        "in_channels": plan["in_channels"],
        "label_names": plan["labels"],
        "out_channels": plan["out_channels"],
        "axcodes": plan["spacing"]["axcodes"],
        "pixdim": plan["spacing"]["pixdim"],
        "roi_size": plan["patch"]["roi_size"],
        "features": net["filters"],
        "kernel_size": net["kernel_size"],
        "strides": net["strides"],
        "deep_supervision": net["deep_supervision"],
        "deep_supr_num": net["deep_supr_num"],
        "res_block": net["res_block"],
        "network_def": {"_target_": "pipeline.networks.build_network", "name": net["name"],
                        "spatial_dims": "@spatial_dims", "in_channels": "@in_channels",
                        "out_channels": "@out_channels", "filters": "@features", "kernel_size": "@kernel_size",
                        "strides": "@strides", "upsample_kernel_size": "$@strides[1:]",
                        "deep_supervision": "@deep_supervision", "deep_supr_num": "@deep_supr_num",
                        "res_block": "@res_block"},
        "network": "$@network_def.to(@device)",
        "image_keys": ["image", "label"],
        "deterministic_transforms": [
            {"_target_": "LoadImaged", "keys": "@image_keys", "allow_missing_keys": True},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_keys", "allow_missing_keys": True},
            {"_target_": "Orientationd", "keys": "@image_keys", "axcodes": "@axcodes", "allow_missing_keys": True},
            {"_target_": "Spacingd", "keys": "@image_keys", "pixdim": "@pixdim", "mode": ["bilinear", "nearest"],
             "allow_missing_keys": True},
            *plan["normalisation"]["transforms"],
        ],
        "preprocessing": {"_target_": "Compose", "transforms": "@deterministic_transforms"},
        "overlap": inf["overlap"],
        "margin": inf["margin"],
        "tta": inf["tta"],
        "tta_axes": inf["tta_axes"],
        "tta_shift": inf["tta_shift"],
        "lateral_axis": inf["lateral_axis"],
        "lateral_pairs": inf["lateral_pairs"],
        "sw_batch_size": inf["sw_batch_size"],
        "tiling": inf["tiling"],
        "tile_margin": None,
        "tile_window": None,
        "tile_multiple": 16,
        "inferer": _inferer(plan, overlap="@overlap", margin="@margin", tta="@tta", tta_axes="@tta_axes",
                            tta_shift="@tta_shift", lateral_axis="@lateral_axis", lateral_pairs="@lateral_pairs",
                            sw_batch_size="@sw_batch_size", amp="@amp", tiling="@tiling", tile_margin="@tile_margin",
                            tile_window="@tile_window", tile_multiple="@tile_multiple"),
        "dataset": {"_target_": "pipeline.predict_io.StudyStream", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "folds": [],
        "weights": "$pipeline.ensemble.weight_paths(@bundle_root, @model_path, @folds)",
        "predictor": {"_target_": "pipeline.ensemble.load_predictor", "network_def": "@network_def",
                      "paths": "@weights", "device": "@device"},
        "metric_postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True, "to_onehot": "@out_channels"},
            {"_target_": "AsDiscreted", "keys": "label", "to_onehot": "@out_channels"}]},
        "initialize": ["$monai.utils.set_determinism(seed=@seed)"],
    }


def _random_transforms(plan: dict[str, Any]) -> list[dict[str, Any]]:
    crop = {"_target_": "RandCropByPosNegLabeld", "keys": "@crop_keys", "label_key": "label",
            "spatial_size": "@crop_size", "pos": "$@pos_neg[0]", "neg": "$@pos_neg[1]",
            "num_samples": "@num_samples"}
    squeeze = [{"_target_": "SqueezeDimd", "keys": "@crop_keys", "dim": "$@slice_axis + 1"}]
    affine = {"_target_": "RandAffined", "keys": "@crop_keys", "prob": "@affine_prob",
              "rotate_range": "@rotate_range_rad", "scale_range": "@scale_range",
              "mode": ["bilinear", "nearest", "bilinear"], "padding_mode": "border"}
    return [crop, *(squeeze if plan["slice_axis"] is not None else []), affine]


def train_config(plan: dict[str, Any]) -> dict[str, Any]:
    """train.json: the schedule, sampling, augmentation, loss, trainer and validation."""
    s, aug, loss, smp = plan["schedule"], plan["augmentation"], plan["loss"], plan["sampling"]
    intensity = [
        {"_target_": "RandGaussianNoised", "keys": "image", "prob": "@noise_prob", "std": 0.1},
        {"_target_": "RandScaleIntensityd", "keys": "image", "factors": 0.1, "prob": "@intensity_prob"},
        {"_target_": "RandShiftIntensityd", "keys": "image", "offsets": 0.1, "prob": "@intensity_prob"},
        {"_target_": "RandGaussianSmoothd", "keys": "image", "sigma_x": [0.5, 1.0], "sigma_y": [0.5, 1.0],
         "sigma_z": [0.5, 1.0], "prob": "@blur_prob"},
        {"_target_": "RandScaleIntensityFixedMeand", "keys": "image", "factors": 0.25, "preserve_range": True,
         "prob": "@contrast_prob"},
        {"_target_": "RandSimulateLowResolutiond", "keys": "image", "zoom_range": [0.5, 1.0],
         "upsample_mode": "trilinear" if plan["spatial_dims"] == 3 else "bilinear", "prob": "@lowres_prob"},
        {"_target_": "RandAdjustContrastd", "keys": "image", "gamma": [0.7, 1.5], "retain_stats": True,
         "prob": "@gamma_prob"}]
    cached = {"_target_": "pipeline.loaders.cached_dataset", "cache_dir": "@cache_dir", "cache_rate": "@cache_rate",
              "num_workers": "@num_workers"}
    return {
        "+imports": ["$import ignite.distributed as idist", "$import pipeline.amp", "$import pipeline.train",
                     "$import pipeline.losses", "$import pipeline.transforms", "$import pipeline.loaders"],
        "max_epochs": s["max_epochs"], "time_budget_min": s["time_budget_min"], "val_interval": s["val_interval"],
        "model_selection": s["model_selection"], "batch_size": smp["batch_size"], "num_samples": smp["num_samples"],
        "pos_neg": smp["pos_neg"], "epoch_length": s["epoch_length"], "drop_last": s["drop_last"],
        "learning_rate": s["learning_rate"], "weight_decay": s["weight_decay"], "grad_clip_norm": s["grad_clip_norm"],
        "ema_decay": 0.0, "init_weights": None,
        "initialize": ["$monai.utils.set_determinism(seed=@seed)",
                       "$pipeline.train.init_weights(@network, @init_weights, @fold)"],
        "early_stop_patience": 0, "checkpoint_interval": 1, "compile": s["compile"],
        "num_workers": "$0 if @device.type == 'cpu' else 4", "cache_dir": None, "cache_rate": 1.0,
        **{k: aug[k] for k in ("flip_axes", "flip_prob", "affine_prob")},
        "rotate_range_rad": aug["rotate_range"], "scale_range": aug["scale_range"],
        **{k: aug[k] for k in ("noise_prob", "intensity_prob", "blur_prob", "contrast_prob", "lowres_prob",
                               "gamma_prob")},
        "sw_overlap": plan["inference"]["val_overlap"], "val_margin": 0, "qc_cases": 3, "export": True,
        "w0": loss["w0"], "sigma_mm": loss["sigma_mm"], "class_weights": loss["class_weights"],
        "border_on": loss["border_on"], "lambda_dice": loss["lambda_dice"], "lambda_ce": loss["lambda_ce"],
        "dice_include_background": loss["dice_include_background"], "batch_dice": loss["batch_dice"],
        "crop_size": plan["patch"]["crop_size"], "crop_keys": ["image", "label", "weight"],
        "amp_dtype": "$pipeline.amp.autocast_dtype(@device, @amp)",
        "train_network": "$idist.auto_model(@network)",
        "loss": {"_target_": "pipeline.losses.BoundaryWeightedDiceCELoss", "lambda_dice": "@lambda_dice",
                 "lambda_ce": "@lambda_ce", "include_background": "@dice_include_background", "batch": "@batch_dice"},
        "optimizer": {"_target_": "torch.optim.AdamW", "params": "$@network.parameters()", "lr": "@learning_rate",
                      "weight_decay": "@weight_decay"},
        "lr_scheduler": {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "optimizer": "@optimizer",
                         "T_max": "@max_epochs"},
        "train": {
            "datalist": "$pipeline.manifest.datalist(@manifest, 'train', @fold, @num_folds, @seed, @splits_file)",
            "weight_transforms": [
                {"_target_": "pipeline.transforms.BoundaryWeightMapd", "keys": "label", "weight_key": "weight",
                 "w0": "@w0", "sigma": "@sigma_mm", "class_weights": "@class_weights", "border_on": "@border_on"}],
            "pad_transforms": [{"_target_": "SpatialPadd", "keys": "@crop_keys", "mode": "symmetric",
                                "spatial_size": "@crop_size"}],
            "random_transforms": _random_transforms(plan),
            "flip_transforms": {"_target_": "pipeline.transforms.flip_transforms", "keys": "@crop_keys",
                                "axes": "@flip_axes", "prob": "@flip_prob", "lateral_axis": "@lateral_axis",
                                "pairs": "@lateral_pairs"},
            "intensity_transforms": intensity,
            "preprocessing": {"_target_": "Compose", "transforms": (
                "$@deterministic_transforms + @train#weight_transforms + @train#pad_transforms + "
                "@train#random_transforms + @train#flip_transforms + @train#intensity_transforms")},
            "dataset": {**cached, "data": "@train#datalist", "transform": "@train#preprocessing"},
            "dataloader": {"_target_": "pipeline.loaders.loader", "dataset": "@train#dataset",
                           "batch_size": "@batch_size", "shuffle": True, "num_workers": "@num_workers",
                           "drop_last": "@drop_last"},
            "inferer": {"_target_": "pipeline.amp.autocast_inferer", "inferer": {"_target_": "SimpleInferer"},
                        "device": "@device", "dtype": "@amp_dtype"},
            "handlers": [
                {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "print_lr": False},
                {"_target_": "pipeline.time_budget.TimeBudget", "optimizer": "@optimizer", "minutes": "@time_budget_min"},
                {"_target_": "pipeline.handlers.ValidationHandler", "validator": "@validate#evaluator",
                 "epoch_level": True, "interval": "@val_interval"},
                {"_target_": "StatsHandler", "tag_name": "train_loss", "iteration_log": False,
                 "output_transform": "$monai.handlers.from_engine(['loss'], first=True)"}],
            "trainer": {"_target_": "SupervisedTrainer", "max_epochs": "@max_epochs", "device": "@device",
                        "train_data_loader": "@train#dataloader", "epoch_length": "@epoch_length",
                        "network": "@train_network", "loss_function": "@loss",
                        "prepare_batch": "$pipeline.losses.prepare_batch_with_weight", "optimizer": "@optimizer",
                        "inferer": "@train#inferer", "amp": "$pipeline.amp.cuda_amp(@device, @amp_dtype)",
                        "amp_kwargs": {"dtype": "@amp_dtype"}, "train_handlers": "@train#handlers",
                        "compile": "@compile"}},
        "validate": {
            "datalist": "$pipeline.manifest.datalist(@manifest, 'val', @fold, @num_folds, @seed, @splits_file)",
            "dataset": {**cached, "data": "@validate#datalist", "transform": "@preprocessing"},
            "dataloader": {"_target_": "pipeline.loaders.loader", "dataset": "@validate#dataset", "batch_size": 1,
                           "shuffle": False, "num_workers": 0},
            "inferer": _inferer(plan, sw_batch_size="@sw_batch_size", overlap="@sw_overlap", margin="@val_margin",
                                amp="@amp"),
            "handlers": [
                {"_target_": "StatsHandler", "iteration_log": False},
                {"_target_": "pipeline.handlers.ModelSaver", "network": "@network",
                 "path": "$@output_dir + '/model.pt'", "selection": "@model_selection"}],
            "key_metric": {"val_mean_dice": {"_target_": "MeanDice", "include_background": False,
                                             "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}},
            "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                          "val_data_loader": "@validate#dataloader", "network": "@network",
                          "inferer": "@validate#inferer", "postprocessing": "@metric_postprocessing",
                          "key_val_metric": "@validate#key_metric", "val_handlers": "@validate#handlers",
                          "amp": False}},
        "run": ["$@train#trainer.run()"],
        "finalize": ["$monai.utils.set_determinism(seed=None)"],
    }


def inference_config() -> dict[str, Any]:
    """inference.json: studies of ``input`` (a manifest, folder or file) -> masks, as the shipped bundles."""
    return {
        "+imports": ["$import pipeline.predict_io"],
        "input": "@manifest",
        "prediction_dir": "$@output_dir + '/predictions'",
        "datalist": "$pipeline.predict_io.list_studies(@input, @in_channels, @prediction_dir)",
        "max_voxels": 268435456,
        "save_probabilities": False,
        "postprocess": {"keep_largest": [], "fill_holes": []},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "pipeline.postprocess.InvertToLabelsd", "keys": "pred", "transform": "@preprocessing",
             "orig_key": "image", "softmax": "$not @inferer.outputs_probabilities", "postprocess": "@postprocess",
             "save_probabilities": "@save_probabilities"},
            {"_target_": "pipeline.postprocess.SaveMaskd", "keys": "pred", "output_dir": "@prediction_dir",
             "save_probabilities": "@save_probabilities"}]},
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@predictor", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "run": ["$pipeline.ensemble.held_out_note(@folds, @fold, @eval_role)", "$@evaluator.run()",
                "$pipeline.predict_io.exit_if_failed(@dataset)"],
    }


def evaluate_config() -> dict[str, Any]:
    """evaluate.json: Dice of the held-out fold with the bundle's weights, as the shipped bundles."""
    return {
        "eval_role": "val",
        "eval_dir": "$@output_dir + '/evaluate'",
        "datalist": "$pipeline.manifest.datalist(@manifest, @eval_role, @fold, @num_folds, @seed, @splits_file)",
        "key_metric": {"mean_dice": {"_target_": "MeanDice", "include_background": False, "save_details": True,
                                     "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}},
        "handlers": [
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "MetricsSaver", "save_dir": "@eval_dir", "metrics": ["mean_dice"],
             "metric_details": ["mean_dice"],
             "batch_transform": "$lambda batch: [item['image'].meta for item in batch]",
             "summary_ops": ["mean", "std", "median", "min", "max"]}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@predictor", "inferer": "@inferer", "postprocessing": "@metric_postprocessing",
                      "key_val_metric": "@key_metric", "val_handlers": "@handlers", "amp": False},
        "run": ["$pipeline.ensemble.held_out_note(@folds, @fold, @eval_role)", "$@evaluator.run()",
                "$pipeline.predict_io.exit_if_failed(@dataset)"],
    }


def bundle_configs(plan: dict[str, Any], dataset_dir: str, manifest_name: str) -> dict[str, dict[str, Any]]:
    """The four workflow configs of a plan: ``{"common.json": ..., "train.json": ..., ...}``."""
    return {"common.json": common_config(plan, dataset_dir, manifest_name), "train.json": train_config(plan),
            "inference.json": inference_config(), "evaluate.json": evaluate_config()}
