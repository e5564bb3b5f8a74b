"""The predictor network of a bundle: one set of weights, or a fold ensemble.

Every bundle's ``common.json`` declares

    "folds": [],                          # [] = the single model_path; [0, 2] = models/fold_0.pt, fold_2.pt
    "weights": "$pipeline.ensemble.weight_paths(@bundle_root, @model_path, @folds)",
    "predictor": {"_target_": "pipeline.ensemble.load_predictor", "network_def": "@network_def",
                  "paths": "@weights", "device": "@device"}

and both ``segpipe predict`` and the bundle's ``inference.json``/``evaluate.json`` run
``@predictor``: ``--set folds=[0]`` picks a subset of a shipped ensemble, ``--set model_path=...``
(with ``folds`` empty) a single file.

An ensemble averages the softmax probabilities of its members, window by window: its forward
returns ``log(mean_k softmax(net_k(x)))``, which the inferer treats as logits; since those
probabilities sum to one, ``softmax`` of it is exactly the members' mean, so flip TTA around it
averages over folds x flips, and memory grows with the window batch, not with the volume or the
number of folds (the stitched output is one accumulator, as for one network).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

FOLD_WEIGHTS = "models/fold_{}.pt"


def held_out_note(folds: Sequence[int] | None, fold: int, eval_role: str) -> None:
    """Warn where a bundle's ``evaluate.json`` scores its fold ensemble on fold ``fold``'s
    validation cases: every other member trained on them, so the Dice is no held-out figure (the
    out-of-fold Dice of the cross-validation is, in the bundle's docs)."""
    others = [k for k in (folds or []) if k != fold] if isinstance(folds, (list, tuple)) else []
    if eval_role == "val" and others:
        log.warning("evaluating the ensemble of folds %s on fold %d's validation cases, which fold(s) %s trained on: "
                    "not a held-out figure (the bundle's docs give the out-of-fold Dice; --set 'folds=[%d]' scores "
                    "the one model that never saw them)", list(folds or []), fold, others, fold)


def weight_paths(bundle_root: str | Path, model_path: str | Path, folds: Sequence[int]) -> list[str]:
    """``[model_path]`` when ``folds`` is empty (``[]`` or null), else the bundle's
    ``models/fold_<k>.pt`` files. Anything but a list of fold numbers is a UsageError: ``folds=0``
    once meant the single model (0 is falsy), in a bundle that ships both; so is a fold the bundle
    does not ship (``--set folds=[7]``: not in its ``exported_folds``), naming those it does."""
    from pipeline.errors import UsageError

    if folds is None or (isinstance(folds, (list, tuple)) and not folds):
        return [str(model_path)]
    if not isinstance(folds, (list, tuple)) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0
                                                         for k in folds):
        raise UsageError(f"folds: expected a list of fold numbers such as [0] or [0, 1, 2, 3, 4], or [] for the "
                         f"single model, got {folds!r:.40} (--set 'folds=[0]')")
    paths = [Path(bundle_root) / FOLD_WEIGHTS.format(k) for k in folds]
    have = exported_folds(bundle_root)
    stray = [k for k, p in zip(folds, paths, strict=True) if not p.is_file() and k not in have]
    if stray:  # a fold the bundle never had; one it lists whose file is gone: load_weights names the file
        raise UsageError(f"folds: fold {stray[0]} is not among the bundle's exported folds {have} "
                         f"({Path(bundle_root) / 'models'}); " +
                         ("choose among them" if have else "export some with segpipe export-ensemble") +
                         (f", or --set folds=[] for the single model ({model_path})" if Path(model_path).is_file()
                          else ""))
    return [str(p) for p in paths]


def exported_folds(bundle_root: str | Path) -> list[int]:
    """The folds the bundle ships: those its metadata's ``ensemble`` lists (export-ensemble), else
    those it has ``models/fold_<k>.pt`` files of."""
    from pipeline.bundle import bundle_metadata
    from pipeline.errors import SegpipeError

    try:
        listed = (bundle_metadata(Path(bundle_root)).get("ensemble") or {}).get("folds")
    except (SegpipeError, AttributeError):
        listed = None
    if isinstance(listed, list) and all(isinstance(k, int) for k in listed):
        return sorted(listed)
    found = (p.name.removeprefix("fold_").removesuffix(".pt") for p in (Path(bundle_root) / "models").glob("fold_*.pt"))
    return sorted(int(k) for k in found if k.isdigit())


class Ensemble(nn.Module):
    """Members' softmax probabilities averaged, returned as log-probabilities (see the module
    docstring); deep-supervision heads (training mode) are not supported: eval only."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = None
        for net in self.members:
            out = net(x)
            out = out[0] if isinstance(out, (list, tuple)) else out
            p = torch.softmax(out.float(), dim=1)
            mean = p if mean is None else mean.add_(p)
        assert mean is not None
        return mean.div_(len(self.members)).clamp_min_(torch.finfo(torch.float32).tiny).log_()


def load_predictor(network_def: nn.Module, paths: Sequence[str | Path], device: torch.device | str = "cpu") -> nn.Module:
    """``network_def`` with the weights of ``paths[0]``, or an ``Ensemble`` of copies of it with
    each file's weights; on ``device``, in eval mode. A missing file, or weights of another
    network, is an InputError naming the file (``predict_io.load_weights``)."""
    import copy

    from pipeline.predict_io import load_weights

    if not paths:
        raise ValueError("load_predictor needs at least one weights file")
    members = [load_weights(network_def if i == 0 else copy.deepcopy(network_def), Path(p))
               for i, p in enumerate(paths)]
    if len(members) > 1:
        log.info("fold ensemble of %d models: %s", len(members), ", ".join(Path(p).name for p in paths))
    net: Any = members[0] if len(members) == 1 else Ensemble(members)
    return net.to(device).eval()
