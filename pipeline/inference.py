"""The predictor: mirror padding, windows tiled two ways (``tiling``), flip and shift TTA (``pipeline.tta``).

``tiling="blend"``: ``predict_tiles`` pads every side of the volume by a context margin with
*reflect* mirroring (border voxels see mirrored image, not zeros), runs
``monai.inferers.sliding_window_inference`` over the padded volume (overlapping windows, Gaussian
blending) and crops the margin away. With ``margin=0`` and ``tta=False`` its output equals MONAI's
sliding_window_inference with the same arguments on volumes at least as large as the ROI. Smaller
volumes are mirror-padded up to the ROI (MONAI would pad them with zeros).

``tiling="overlap-tile"``: the U-Net paper's overlap-tile strategy (``pipeline.tiling``): each
window keeps only its centre, at least ``tile_margin`` voxels from every face; the centres tile the
volume exactly; context is the neighbouring image or, at the border, mirror padding; no blending.
Windows are at least the ROI and at most ``tile_window`` (larger windows waste less margin).

Constant windows (every voxel of each channel one value: air below a CT window, background after
z-scoring) are computed once per value and reused (``reuse_constant_windows``): the same output, a
third fewer network calls on the head-and-neck CTs.

Speed on CPU: ``torch.inference_mode``, freed memory kept for reuse (``pipeline.cpu_memory``: no
page faults for each window's activations, 1.5x), channels-last 3D windows and weights in bf16,
several windows per network call (the TTA passes of a smaller batch too: ``grouped_calls``), and
opt-in ``compile`` (torch.compile with inductor freezing; 0.89-1.09x in fp32, see BENCHMARKS.md). ``amp`` asks ``pipeline.amp`` for the autocast dtype of the
device the network runs on (bf16 on CPUs that compute it natively and on recent GPUs, fp16 on
older GPUs, fp32 otherwise); the default is fp32.
On CUDA the stitched volume lives on the GPU unless that runs out of memory; then the call is
repeated with stitching on the CPU.

``OverlapTileInferer`` wraps the same function as a ``monai.inferers.Inferer`` so bundles'
evaluators (validation during training, ``configs/inference.json``) use the same predictor.

    >>> inferer = OverlapTileInferer(roi_size=(96, 96, 96), tta=True)     # doctest: +SKIP
    >>> probs = inferer(image[None], network)   # (1, C, H, W, D) probabilities (TTA)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer, sliding_window_inference
from monai.utils import ensure_tuple_rep, fall_back_tuple

from pipeline.amp import autocast, autocast_dtype
from pipeline.cpu_memory import keep_freed_memory
from pipeline.errors import first_line
from pipeline.tiling import overlap_tile, plan_padding, tile_plan
from pipeline.tta import (
    flip_combinations,
    grouped_calls,
    shift_offsets,
    shift_window,
    swap_channels,
    unshift_add,
)

log = logging.getLogger(__name__)

TILINGS = ("blend", "overlap-tile")


def _scan_interval(roi: int, overlap: float) -> int:
    """MONAI's window step along an axis (``monai.inferers.utils._get_scan_interval``)."""
    return max(int(roi * (1 - overlap)), 1)


def windows_per_axis(size: int, roi: int, overlap: float) -> int:
    """How many windows MONAI's sliding_window_inference places along an axis of ``size`` voxels."""
    if size <= roi:
        return 1
    return -(-(size - roi) // _scan_interval(roi, overlap)) + 1


def free_margin(size: int, roi: int, overlap: float) -> int:
    """The largest context margin per side that adds no window along this axis (the slack the last
    window has anyway), capped at a quarter of the ROI. 0 for an axis the ROI fits exactly (and
    for an axis smaller than the ROI, which ``tile_padding`` mirror-pads up to the ROI anyway)."""
    n = windows_per_axis(size, roi, overlap)
    if n == 1:
        return 0
    covered = (n - 1) * _scan_interval(roi, overlap) + roi
    return min(roi // 4, (covered - size) // 2)


def resolve_margin(roi_size: Sequence[int], margin: int | str | Sequence[int] | None,
                   shape: Sequence[int] | None = None, overlap: float | Sequence[float] = 0.5) -> tuple[int, ...]:
    """Context margin per spatial axis. ``"auto"`` (the default): per axis the largest margin up to
    a quarter of the ROI that adds no windows (``free_margin``: mirrored context at no extra network
    cost); ``None`` or ``"quarter"``: a quarter of the ROI (the paper's full overlap-tile context,
    more windows); an int applies to every axis; a sequence gives one per axis."""
    if margin is None or margin == "quarter":
        return tuple(int(r) // 4 for r in roi_size)
    if margin == "auto":
        if shape is None:
            raise ValueError("margin 'auto' needs the volume's shape")
        ov = ensure_tuple_rep(overlap, len(roi_size))
        return tuple(free_margin(int(n), int(r), float(o)) for n, r, o in zip(shape, roi_size, ov, strict=True))
    if isinstance(margin, str):
        raise ValueError(f"margin must be 'auto', 'quarter', an int or one int per axis, got {margin!r}")
    out = tuple(int(m) for m in ensure_tuple_rep(margin, len(roi_size)))
    if any(m < 0 for m in out):
        raise ValueError(f"margin must be >= 0, got {margin}")
    return out


def tile_padding(shape: Sequence[int], roi_size: Sequence[int], margin: Sequence[int]) -> list[tuple[int, int]]:
    """(before, after) per spatial axis: the margin, plus what a volume smaller than the ROI lacks."""
    pads = []
    for n, r, m in zip(shape, roi_size, margin, strict=True):
        short = max(r - (n + 2 * m), 0)
        pads.append((m + short // 2, m + short - short // 2))
    return pads


def mirror_pad(x: torch.Tensor, pads: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Pad the spatial axes of ``x`` (N, C, *spatial) by ``pads`` [(before, after), ...] with
    reflect mirroring. torch's reflect needs pad < size, so larger pads repeat the mirroring in
    steps (each step mirrors the already padded volume: a periodic mirror extension). An axis of
    size 1 cannot be mirrored: it is replicated (logged)."""
    nd = x.ndim - 2
    for axis, (lo, hi) in enumerate(pads):
        while lo > 0 or hi > 0:
            n = x.shape[2 + axis]
            mode = "reflect" if n > 1 else "replicate"
            step_lo, step_hi = (min(lo, n - 1), min(hi, n - 1)) if n > 1 else (lo, hi)
            if mode == "replicate":
                log.info("axis %d has one voxel: padding it by replication instead of mirroring", axis)
            spec = [0] * (2 * nd)
            spec[2 * (nd - 1 - axis)], spec[2 * (nd - 1 - axis) + 1] = step_lo, step_hi
            x = F.pad(x, spec, mode=mode)
            lo, hi = lo - step_lo, hi - step_hi
    return x


def compiled(network: torch.nn.Module) -> Callable[..., Any]:
    """``torch.compile`` with inductor freezing (weights folded in as constants: for a network
    whose weights no longer change, e.g. batch prediction), built once per network and kept on
    it. If compiling fails, the network runs eagerly from then on (logged)."""
    cached = getattr(network, "_segpipe_compiled", None)
    if cached is not None:
        return cached
    log.info("compiling %s with torch.compile (freezing); the first windows take a while",
             type(network).__name__)
    fn: Callable[..., Any] = torch.compile(network, dynamic=False, options={"freezing": True})

    def call(x: torch.Tensor) -> Any:
        nonlocal fn
        try:
            return fn(x)
        except Exception as e:  # noqa: BLE001 - compiler errors come in many kinds
            if fn is network:
                raise
            log.warning("torch.compile failed (%s); running %s eagerly",
                        first_line(e), type(network).__name__)
            fn = network
            return network(x)

    object.__setattr__(network, "_segpipe_compiled", call)
    return call


def window_predictor(network: Callable[..., Any], spatial_dims: int, tta: bool, channels_last: bool,
                     device: torch.device, dtype: torch.dtype | None, batch_size: int = 0,
                     tta_axes: Sequence[int] | None = None, tta_shift: int = 0,
                     lateral_pairs: Sequence[Sequence[int]] | None = None,
                     lateral_axis: int | None = 0, reuse_constant: bool = True,
                     pass_batch: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-window-batch function handed to sliding_window_inference: the network's logits,
    or with ``tta`` the mean of the softmax probabilities over every flip (flipped back).
    ``batch_size`` > 0 pads a short last batch to that size (a compiled network sees one shape).
    ``tta_axes``: the spatial axes whose flips are averaged (None: all). ``tta_shift`` > 0: with
    ``tta``, each flip is also predicted with the window's content moved +-``tta_shift`` voxels
    along each axis (mirror-filled) and moved back; each voxel averages the passes that cover it.
    ``lateral_pairs``: (left, right) class pairs whose probabilities a flip along ``lateral_axis``
    (the patient's left-right: spatial axis 0 after ``Orientationd`` RAS) swaps after flipping back:
    on a mirrored image the network calls the left organ right (``pipeline.laterality``). None
    (default): no swap, every flip averaged as it is. ``reuse_constant`` (default): windows whose
    input is one value per channel are predicted once per value and shape (``reuse_constant_windows``).
    ``pass_batch`` > 0: the TTA passes of a window batch smaller than this share network calls of up
    to ``pass_batch`` windows (one window with 14 passes: 4 calls instead of 14; ``grouped_calls``);
    0 (default): one call per pass."""
    fmt = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
    flips = flip_combinations(spatial_dims, tta_axes) if tta else [()]
    if lateral_pairs and lateral_axis is not None and not 0 <= int(lateral_axis) < spatial_dims:
        raise ValueError(f"lateral_axis {lateral_axis}: spatial axes are 0..{spatial_dims - 1}")
    lateral_dim = int(lateral_axis) + 2 if lateral_pairs and lateral_axis is not None else None
    shifts = shift_offsets(spatial_dims, int(tta_shift or 0))

    def run(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if 0 < n < batch_size:
            x = torch.cat([x, x.new_zeros((batch_size - n, *x.shape[1:]))])
        if channels_last:
            x = x.contiguous(memory_format=fmt)
        with autocast(device, dtype):
            y = network(x)
        y = y[:n] if isinstance(y, torch.Tensor) else y
        if isinstance(y, (list, tuple)):  # deep supervision heads: the full-resolution one
            y = y[0][:n]
        return y.float().contiguous()

    def mean_of_flips(outputs: Iterator[torch.Tensor]) -> torch.Tensor:
        """The mean softmax of the next ``len(flips)`` outputs, each flipped (and swapped) back."""
        acc = None
        for axes in flips:
            p = torch.softmax(next(outputs), dim=1)
            p = torch.flip(p, axes) if axes else p
            p = swap_channels(p, lateral_pairs or ()) if lateral_dim in axes else p
            acc = p if acc is None else acc.add_(p)
        assert acc is not None
        return acc.div_(len(flips))

    def run_tta(x: torch.Tensor) -> torch.Tensor:
        views = (torch.flip(moved, axes) if axes else moved
                 for axis, s in shifts for moved in (shift_window(x, axis, s),) for axes in flips)
        outputs = grouped_calls(run, views, max(1, pass_batch // x.shape[0]) if pass_batch else 1)
        acc = mean_of_flips(outputs)
        if len(shifts) == 1:
            return acc
        count = acc.new_ones((1, 1, *acc.shape[2:]))
        for axis, s in shifts[1:]:
            unshift_add(acc, count, mean_of_flips(outputs), axis, s)
        return acc.div_(count)

    chosen = run_tta if tta else run
    return reuse_constant_windows(chosen) if reuse_constant else chosen


def reuse_constant_windows(predictor: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``predictor`` that computes a *constant* window (every voxel of each channel the same value:
    air below a CT window's lower bound, background after z-scoring, the mirror padding of either)
    only the first time a window of that value and shape comes, and reuses that output for the
    others. The network sees the same input wherever such a window lies (it has no notion of
    position), so the output is the same as computing every window; on CTs with air around the body
    a large share of the windows are constant. The cache lives as long as the returned function
    (one ``predict_tiles`` call)."""
    cache: dict[tuple[Any, ...], torch.Tensor] = {}

    def run(x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        const = (flat.amax(2) == flat.amin(2)).all(1).tolist()
        if not any(const):
            return predictor(x)
        keys = [(tuple(x.shape[1:]), *flat[i, :, 0].tolist()) if c else None for i, c in enumerate(const)]
        for i, key in enumerate(keys):
            if key is not None and key not in cache:
                cache[key] = predictor(x[i:i + 1])
        varying = [i for i, c in enumerate(const) if not c]
        rest = iter(predictor(x[varying]).split(1) if varying else ())
        return torch.cat([cache[key] if key is not None else next(rest) for key in keys])

    return run


def _module_device(network: Any, fallback: torch.device) -> torch.device:
    try:
        return next(network.parameters()).device
    except (AttributeError, StopIteration):
        return fallback


def predict_tiles(network: Callable[..., Any], inputs: torch.Tensor, roi_size: Sequence[int] | int,
                  overlap: float | Sequence[float] = 0.5, margin: int | str | Sequence[int] | None = "auto",
                  tta: bool = False, sw_batch_size: int = 4, mode: str = "gaussian",
                  sigma_scale: float | Sequence[float] = 0.125, device: torch.device | str | None = None,
                  stitch_device: torch.device | str | None = None, amp: bool = False,
                  channels_last: bool | None = None, compile: bool = False,
                  progress: bool = False, tta_axes: Sequence[int] | None = None,
                  tta_shift: int = 0, tiling: str = "blend", tile_margin: int | Sequence[int] | None = None,
                  tile_window: int | Sequence[int] | None = None,
                  tile_multiple: int | Sequence[int] = 16, lateral_pairs: Sequence[Sequence[int]] | None = None,
                  lateral_axis: int | None = 0, reuse_constant: bool = True) -> torch.Tensor:
    """Windowed prediction of ``inputs`` (N, C, *spatial). Returns (N, K, *spatial) float32 on
    the stitching device: the logits, or with ``tta`` the mean softmax probabilities over all
    flips. A MetaTensor input gives a MetaTensor output with the input's meta.

    ``tiling``: "blend" (default: MONAI's overlapping windows with Gaussian blending, over a
    mirror-padded volume; ``overlap``, ``margin``, ``mode`` and ``sigma_scale`` apply) or
    "overlap-tile" (``pipeline.tiling``: each window keeps its centre only, no blending;
    ``tile_margin`` voxels of context per side, None: a sixth of the ROI; windows from the ROI up
    to ``tile_window`` (None: the ROI), in multiples of ``tile_multiple`` (what the network's
    poolings need)). TTA, AMP, channels-last and compile apply to both.

    ``margin``: mirrored context per side: "auto" (default) as much as adds no windows, up to a
    quarter of the ROI; None or "quarter": a quarter of the ROI; 0: none (see ``resolve_margin``).
    ``tta_axes``: with ``tta``, flip only these spatial axes (None: every axis).
    ``tta_shift``: with ``tta``, also average each flip over the window moved +-this many voxels
    along each axis (``window_predictor``): 1 + 2 x dims passes per flip; 0 (default) none.
    ``lateral_pairs``, ``lateral_axis``: with ``tta``, a flip along ``lateral_axis`` (default 0, the
    patient's left-right after RAS) swaps these (left, right) classes' probabilities back
    (``window_predictor``); None (default): no swap.
    ``device``: where the network runs (default: its parameters' device).
    ``stitch_device``: where the full-size output is accumulated (default: ``device``, falling
    back to the CPU when CUDA runs out of memory). ``channels_last``: None = on for CPU 3D in bf16
    (in fp32 channels-first oneDNN convolutions were measured faster).
    ``compile``: on CPU, run the network through ``compiled`` (weights frozen at the first call:
    for fixed weights only, e.g. batch prediction; not for validation during training).
    ``amp``: autocast the windows with ``pipeline.amp.autocast_dtype`` for the run device
    (default False: fp32). ``reuse_constant`` (default): a window whose input is one value per
    channel is computed once per value (``reuse_constant_windows``: the same output, less work)."""
    if tiling not in TILINGS:
        raise ValueError(f"tiling {tiling!r}: choose one of {', '.join(TILINGS)}")
    spatial_dims = inputs.ndim - 2
    meta_src = inputs if isinstance(inputs, MetaTensor) else None
    x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
    shape = tuple(x.shape[2:])
    roi = tuple(int(r) for r in fall_back_tuple(roi_size, shape))
    if tiling == "blend":
        pads = tile_padding(shape, roi, resolve_margin(roi, margin, shape, overlap))
    else:
        tm = [r // 6 for r in roi] if tile_margin is None else ensure_tuple_rep(tile_margin, spatial_dims)
        tw = roi if tile_window is None else ensure_tuple_rep(tile_window, spatial_dims)
        _, tiles = tile_plan(shape, roi, tw, tm, ensure_tuple_rep(tile_multiple, spatial_dims))
        pads = plan_padding(shape, tiles)
    run_device = torch.device(device) if device is not None else _module_device(network, x.device)
    if run_device.type == "cpu":
        keep_freed_memory()  # windows reuse freed activations instead of page-faulting new ones (1.5x)
    dtype = autocast_dtype(run_device, amp)
    if channels_last is None:  # fp32 on a CPU: channels-first measured faster (BENCHMARKS.md)
        channels_last = run_device.type == "cpu" and spatial_dims == 3 and dtype == torch.bfloat16
    if channels_last and isinstance(network, torch.nn.Module):
        network.to(memory_format=torch.channels_last_3d if spatial_dims == 3 else torch.channels_last)
    compile = compile and run_device.type == "cpu" and isinstance(network, torch.nn.Module)
    if compile:  # measured on CPU only (see BENCHMARKS.md); on CUDA, AMP is the lever
        network = compiled(network)
    fn = window_predictor(network, spatial_dims, tta, channels_last, run_device, dtype,
                          batch_size=sw_batch_size if compile else 0, tta_axes=tta_axes, tta_shift=tta_shift,
                          lateral_pairs=lateral_pairs, lateral_axis=lateral_axis, reuse_constant=reuse_constant,
                          pass_batch=sw_batch_size)
    out_device = torch.device(stitch_device) if stitch_device is not None else run_device
    with torch.inference_mode():
        padded = mirror_pad(x.float(), pads) if any(p for pair in pads for p in pair) else x.float()

        def stitch(dev: torch.device) -> torch.Tensor:
            if tiling == "overlap-tile":
                return overlap_tile(fn, padded, shape, tiles, pads, sw_batch_size, run_device, dev)
            out = sliding_window_inference(padded, roi_size=roi, sw_batch_size=sw_batch_size, predictor=fn,
                                           overlap=overlap, mode=mode, sigma_scale=sigma_scale,
                                           sw_device=run_device, device=dev, progress=progress)
            return out[(slice(None), slice(None), *(slice(lo, lo + n) for (lo, _), n in zip(pads, shape, strict=True)))]

        try:
            out = stitch(out_device)
        except torch.cuda.OutOfMemoryError:
            if out_device.type != "cuda":
                raise
            log.warning("CUDA out of memory stitching a %s volume on %s; stitching on the CPU instead",
                        tuple(padded.shape), out_device)
            torch.cuda.empty_cache()
            out = stitch(torch.device("cpu"))
    out = out.clone() if out.is_inference() else out  # usable outside inference_mode (e.g. Invertd)
    if meta_src is not None:
        out = MetaTensor(out, meta=meta_src.meta, applied_operations=meta_src.applied_operations)
    return out


class OverlapTileInferer(Inferer):
    """``predict_tiles`` as a MONAI Inferer: ``inferer(inputs, network)``. Bundles build it with
    ``{"_target_": "pipeline.inference.OverlapTileInferer", "roi_size": "@roi_size", ...}``.
    ``outputs_probabilities`` says whether the output is probabilities (TTA) or logits.
    ``lateral_pairs`` (planned bundles: ``@lateral_pairs``; None by default, as the shipped
    bundles): the flip TTA along ``lateral_axis`` swaps these classes back (``window_predictor``)."""

    def __init__(self, roi_size: Sequence[int] | int, overlap: float | Sequence[float] = 0.5,
                 margin: int | str | Sequence[int] | None = "auto", tta: bool = False, sw_batch_size: int = 4,
                 mode: str = "gaussian", sigma_scale: float | Sequence[float] = 0.125,
                 device: torch.device | str | None = None, stitch_device: torch.device | str | None = None,
                 amp: bool = False, channels_last: bool | None = None, compile: bool = False,
                 progress: bool = False, tta_axes: Sequence[int] | None = None, tta_shift: int = 0,
                 tiling: str = "blend", tile_margin: int | Sequence[int] | None = None,
                 tile_window: int | Sequence[int] | None = None, tile_multiple: int | Sequence[int] = 16,
                 lateral_pairs: Sequence[Sequence[int]] | None = None, lateral_axis: int | None = 0,
                 reuse_constant: bool = True) -> None:
        super().__init__()
        if tiling not in TILINGS:
            raise ValueError(f"tiling {tiling!r}: choose one of {', '.join(TILINGS)}")
        self.kwargs = dict(roi_size=roi_size, overlap=overlap, margin=margin, tta=tta,
                           sw_batch_size=sw_batch_size, mode=mode, sigma_scale=sigma_scale, device=device,
                           stitch_device=stitch_device, amp=amp, channels_last=channels_last,
                           compile=compile, progress=progress, tta_axes=tta_axes, tta_shift=tta_shift,
                           tiling=tiling, tile_margin=tile_margin, tile_window=tile_window,
                           tile_multiple=tile_multiple, lateral_pairs=lateral_pairs, lateral_axis=lateral_axis,
                           reuse_constant=reuse_constant)

    @property
    def outputs_probabilities(self) -> bool:
        return bool(self.kwargs["tta"])

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        return predict_tiles(network, inputs, **{**self.kwargs, **kwargs})

