"""The overlap-tile predictor: MONAI equivalence, mirror padding, TTA, source geometry round trip."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from pipeline.bundle import get, load_bundle
from pipeline.ensemble import Ensemble
from pipeline.inference import (
    OverlapTileInferer,
    flip_combinations,
    mirror_pad,
    predict_tiles,
    resolve_margin,
    shift_offsets,
    shift_window,
    windows_per_axis,
)
from pipeline.postprocess import label_cleanup
from pipeline.tiling import axis_tiles, tile_plan

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "phantom_ct_3d"


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet(3, 1, 3, channels=(4, 8, 16), strides=(2, 2)).eval()


@pytest.mark.parametrize("sw_batch_size", [1, 3])
def test_margin0_equals_monai(unet: torch.nn.Module, sw_batch_size: int) -> None:
    x = torch.rand(1, 1, 30, 27, 21)
    with torch.no_grad():
        ref = sliding_window_inference(x, (16, 16, 12), sw_batch_size, unet, overlap=0.5, mode="gaussian")
    out = predict_tiles(unet, x, (16, 16, 12), overlap=0.5, margin=0, sw_batch_size=sw_batch_size)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_margin_changes_borders_only_a_little(unet: torch.nn.Module) -> None:
    x = torch.rand(1, 1, 30, 27, 21)
    a = predict_tiles(unet, x, (16, 16, 12), margin=0)
    b = predict_tiles(unet, x, (16, 16, 12), margin="quarter")
    assert a.shape == b.shape and not torch.allclose(a, b)
    ident = predict_tiles(lambda w: torch.cat([w, -w], dim=1), x, (16, 16, 12), margin=(5, 3, 7))
    torch.testing.assert_close(ident[:, :1], x, atol=1e-6, rtol=0)  # the crop lands on the volume


def _count_windows(x: torch.Tensor, roi: tuple[int, ...], margin: object) -> int:
    calls: list[int] = []

    def net(w: torch.Tensor) -> torch.Tensor:
        calls.append(w.shape[0])
        return torch.cat([w, -w], dim=1)

    predict_tiles(net, x, roi, margin=margin, sw_batch_size=1)
    return len(calls)


def test_auto_margin_adds_context_but_no_windows() -> None:
    x = torch.rand(1, 1, 33, 37, 20)
    roi = (16, 16, 12)
    margin = resolve_margin(roi, "auto", x.shape[2:], 0.5)
    assert margin == (3, 1, 2)  # 4 windows cover 40 voxels: slack 7 -> 3 and 3 -> 1; 3 cover 24: 4 -> 2
    assert all(windows_per_axis(n + 2 * m, r, 0.5) == windows_per_axis(n, r, 0.5)
               for n, r, m in zip(x.shape[2:], roi, margin, strict=True))
    assert _count_windows(x, roi, "auto") == _count_windows(x, roi, 0) == 4 * 4 * 3
    assert _count_windows(x, roi, "quarter") > 4 * 4 * 3
    assert resolve_margin((96, 96, 96), "auto", (256, 256, 128), 0.5) == (16, 16, 8)
    assert resolve_margin((16, 16, 12), "auto", (16, 10, 12), 0.5) == (0, 0, 0)  # fits exactly / smaller
    with pytest.raises(ValueError, match="margin"):
        resolve_margin(roi, "wide", x.shape[2:], 0.5)


def _air_volume() -> torch.Tensor:
    """A 2-channel CT-like volume: two bodies in air that is one value per channel (air clipped by a
    window), two different air values on either side of the middle, so both reuse keys occur."""
    torch.manual_seed(1)
    x = torch.full((1, 2, 80, 64, 40), -0.5)
    x[:, 1] = 0.25
    x[:, :, 40:] -= 1.0
    x[:, :, 6:20, 8:30, 10:26] = torch.rand(1, 2, 14, 22, 16)
    x[:, :, 48:60, 20:40, 4:18] = torch.rand(1, 2, 12, 20, 14)
    return x


@pytest.mark.parametrize("options", [dict(tiling="blend", margin="auto"), dict(tiling="blend", tta=True, tta_axes=[0]),
                                     dict(tiling="overlap-tile", tta=True, tta_axes=[1], tile_margin=2)])
def test_constant_windows_are_computed_once_with_the_same_output(options: dict) -> None:
    torch.manual_seed(0)
    net = UNet(3, 2, 3, channels=(4, 8, 16), strides=(2, 2), norm="instance").eval()
    seen: list[torch.Tensor] = []

    def counted(w: torch.Tensor) -> torch.Tensor:
        seen.append(w.flatten(2))
        return net(w)

    x = _air_volume()
    out, windows, constant_calls = {}, {}, {}
    for reuse in (False, True):
        seen.clear()
        out[reuse] = predict_tiles(counted, x, (16, 16, 16), sw_batch_size=3, reuse_constant=reuse, **options)
        windows[reuse] = sum(w.shape[0] for w in seen)
        constant_calls[reuse] = sum(bool(((w.amax(2) == w.amin(2)).all(1)).any()) for w in seen)
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=0)
    assert windows[True] < 0.6 * windows[False], windows
    assert constant_calls[False] > constant_calls[True] > 0


def test_reuse_keeps_windows_of_different_constants_apart() -> None:
    seen: list[float] = []

    def net(w: torch.Tensor) -> torch.Tensor:  # position-free, value-dependent output
        seen.extend(float(v) for v in w.flatten(1)[:, 0])
        return torch.cat([w.exp(), w], dim=1)

    x = torch.zeros(1, 1, 40, 16, 16)
    x[:, :, 24:] = 2.0
    out = predict_tiles(net, x, (8, 16, 16), overlap=0.0, margin=0, sw_batch_size=2)
    torch.testing.assert_close(out[:, 1:], x)
    assert sorted(set(seen)) == [0.0, 2.0] and len(seen) == 2  # 5 windows, one per value computed


@pytest.mark.parametrize("shape,pads", [((1, 1, 5, 4, 3), [(2, 1), (3, 3), (1, 2)]),
                                        ((1, 2, 3, 2, 4), [(7, 11), (5, 1), (9, 0)])])
def test_mirror_pad_matches_numpy_reflect(shape: tuple[int, ...], pads: list[tuple[int, int]]) -> None:
    x = torch.rand(shape)
    want = np.pad(x.numpy(), [(0, 0), (0, 0), *pads], mode="reflect")  # numpy mirrors repeatedly
    np.testing.assert_array_equal(mirror_pad(x, pads).numpy(), want)


def test_volume_much_smaller_than_roi_is_mirrored_not_zero_padded() -> None:
    x = torch.rand(1, 1, 5, 3, 1) + 1.0  # no zeros anywhere; one slice only (replicated)
    seen: list[torch.Tensor] = []

    def net(w: torch.Tensor) -> torch.Tensor:
        seen.append(w.clone())
        return torch.cat([w, -w], dim=1)

    out = predict_tiles(net, x, (16, 16, 8), sw_batch_size=2)
    assert out.shape == (1, 2, 5, 3, 1)
    torch.testing.assert_close(out[:, :1], x)  # identity net: the crop lands on the volume itself
    assert all(w.shape[2:] == (16, 16, 8) and w.min() >= 1.0 for w in seen)


def test_tta_with_flip_equivariant_net_equals_plain() -> None:
    conv = torch.nn.Conv3d(1, 1, 3, padding=1, bias=False)
    torch.nn.init.constant_(conv.weight, 0.3)  # symmetric kernel: commutes with every flip

    def net(w: torch.Tensor) -> torch.Tensor:
        y = conv(w)
        return torch.cat([y, -y, 0.5 * y], dim=1)

    x = torch.rand(1, 1, 12, 12, 8)  # one window: softmax then blend = blend then softmax
    plain = predict_tiles(net, x, (12, 12, 8), margin=0, tta=False)
    tta = OverlapTileInferer((12, 12, 8), margin=0, tta=True)
    assert tta.outputs_probabilities
    torch.testing.assert_close(tta(x, net), torch.softmax(plain, dim=1), atol=1e-5, rtol=0)


def test_tta_uses_all_eight_flips() -> None:
    calls: list[torch.Tensor] = []

    def net(w: torch.Tensor) -> torch.Tensor:
        calls.append(w)
        return torch.cat([w, -w], dim=1)

    predict_tiles(net, torch.rand(1, 1, 8, 8, 8), (8, 8, 8), margin=0, tta=True)  # sw_batch_size 4
    assert [len(c) for c in calls] == [4, 4]  # the 8 passes of one window share calls
    windows = [w for c in calls for w in c]
    firsts = {tuple(w[0, 0, 0, :2].tolist()) + tuple(w[0, -1, -1, -2:].tolist()) for w in windows}
    assert len(windows) == 8 and len(firsts) == 8


# ---------------------------------------------------------------- source geometry


def _rot_z(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


AFFINES = {
    "lps": np.diag([-0.8, -0.8, 2.5]),
    "oblique": np.diag([-1.0, -1.0, 1.0]) @ _rot_z(20) @ np.diag([0.9, 1.1, 2.0]),
}


def _source(tmp_path: Path, kind: str, noise: bool = True) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(1)
    hu = np.where(rng.random((23, 19, 9)) > (0.6 if noise else 2), 200, -100).astype(np.int16)
    hu[2:9, 3:12, 1:6] = 200
    affine = np.eye(4)
    affine[:3, :3] = AFFINES[kind]
    affine[:3, 3] = [120.0, 90.0, -40.0]
    img = nib.Nifti1Image(hu, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    path = tmp_path / f"{kind}.nii.gz"
    nib.save(img, str(path))
    return path, (hu > 40).astype(np.uint8)  # HU 40 -> 0.5 after the bundle's intensity window


class ThresholdNet(torch.nn.Module):
    """One-hot of (x > 0.5), as logits: a pointwise, analytic segmentation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = (x > 0.5).float()
        return torch.cat([1 - fg, fg], dim=1) * 10


def _model(spacing: list[float], out: Path, tta: bool = False) -> dict:
    """The phantom bundle's inference path (preprocessing, inferer, postprocessing writing into
    ``out``) around an analytic network, in fp32."""
    parser = load_bundle(BUNDLE, ("common.json", "inference.json"), {
        "pixdim": spacing, "roi_size": [16, 16, 8], "sw_batch_size": 2, "tta": tta, "amp": False,
        "save_probabilities": "float32", "prediction_dir": str(out)})
    return {"network": ThresholdNet(), "device": torch.device("cpu"), "label_names": ["background", "fg"],
            "max_voxels": 10**7, "in_channels": 1, "spatial_dims": 3,
            **{k: get(parser, k) for k in ("preprocessing", "inferer", "postprocessing")}}


@pytest.mark.parametrize("kind", sorted(AFFINES))
def test_mask_returns_to_source_geometry_exactly(tmp_path: Path, kind: str) -> None:
    from pipeline.predict import read_study, run_model, write_study

    src, expected = _source(tmp_path, kind)
    spacing = [float(s) for s in nib.load(str(src)).header.get_zooms()]
    model = _model(spacing, tmp_path, tta=(kind == "oblique"))
    data = read_study({"id": kind, "image": str(src)}, model, tmp_path)
    assert nib.aff2axcodes(data["image"].affine) == ("R", "A", "S") != nib.aff2axcodes(nib.load(str(src)).affine)
    row = write_study({"id": kind, "image": str(src)}, data, run_model(model, data["image"]), model)
    a, b = nib.load(str(src)), nib.load(row["output"])
    assert b.shape == a.shape and b.get_data_dtype() == np.uint8
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-6)
    assert int(b.header["qform_code"]) == 1 and int(b.header["sform_code"]) == 2
    np.testing.assert_array_equal(np.asarray(b.dataobj), expected)
    assert row["voxels_fg"] == int(expected.sum())
    assert row["ml_fg"] == pytest.approx(expected.sum() * abs(np.linalg.det(a.affine[:3, :3])) / 1000, abs=1e-3)
    probs = nib.load(str(tmp_path / f"{kind}_probs.nii.gz"))
    assert probs.shape == (*a.shape, 2)


def test_resampled_prediction_keeps_source_shape_and_affine(tmp_path: Path) -> None:
    from pipeline.predict import read_study, run_model, write_study

    src, expected = _source(tmp_path, "oblique", noise=False)
    model = _model([1.6, 1.6, 2.5], tmp_path)
    data = read_study({"id": "o", "image": str(src)}, model, tmp_path)
    row = write_study({"id": "o", "image": str(src)}, data, run_model(model, data["image"]), model)
    a, b = nib.load(str(src)), nib.load(row["output"])
    assert b.shape == a.shape
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-6)
    agree = (np.asarray(b.dataobj) == expected).mean()
    assert agree > 0.95  # resampled twice with interpolation: close, not exact


def test_channelwise_inversion_equals_inverting_the_whole_stack(tmp_path: Path) -> None:
    from pipeline.postprocess import invert_to_labels
    from pipeline.predict import read_study

    src, _ = _source(tmp_path, "oblique")
    model = _model([1.6, 1.6, 2.5], tmp_path)
    data = read_study({"id": "o", "image": str(src)}, model, tmp_path)
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(4, *data["image"].shape[1:]) * 3, dim=0)
    low, none = invert_to_labels(probs, data["image"], model["preprocessing"])
    full, inverted = invert_to_labels(probs, data["image"], model["preprocessing"], keep_probabilities=True)
    assert none is None and inverted is not None and inverted.shape[0] == 4
    assert low.dtype == full.dtype == torch.uint8 and tuple(low.shape[1:]) == nib.load(str(src)).shape
    assert torch.equal(low, full) and len(torch.unique(low)) == 4


def test_postprocess_keeps_largest_component_and_fills_holes() -> None:
    from pipeline.postprocess import label_volumes

    lab = torch.zeros(1, 12, 12, 6, dtype=torch.long)
    lab[0, 1:7, 1:7, 1:5] = 1
    lab[0, 3:5, 3:5, 2:4] = 0  # a hole inside label 1
    lab[0, 9:11, 9:11, 1:3] = 1  # a small second component of label 1
    lab[0, 9:11, 1:3, 1:3] = 2
    out = label_cleanup({"keep_largest": [1], "fill_holes": [1]})(lab)
    want = torch.zeros_like(lab)
    want[0, 1:7, 1:7, 1:5] = 1
    want[0, 9:11, 1:3, 1:3] = 2
    assert torch.equal(torch.as_tensor(out), want)
    assert torch.equal(label_cleanup(None)(lab), lab)
    with pytest.raises(ValueError, match="unknown"):
        label_cleanup({"keep_larges": [1]})
    vols = label_volumes(want[0], ["background", "a", "b"], voxel_ml=0.002)
    assert vols == {"voxels_a": 144, "ml_a": 0.288, "voxels_b": 8, "ml_b": 0.016}


def test_tta_axes_limit_the_flips():
    """``tta_axes`` restricts flip TTA to the given spatial axes: a network whose output depends
    on the position along the last axis only gives the plain prediction under flips of axis 0,
    and a different one when every axis is flipped."""
    assert flip_combinations(3) == flip_combinations(3, [0, 1, 2])
    assert flip_combinations(3, [0]) == [(), (2,)]
    assert flip_combinations(2, [1, 0]) == [(), (2,), (3,), (2, 3)]
    with pytest.raises(ValueError, match="tta_axes"):
        flip_combinations(3, [3])
    x = torch.rand(1, 1, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    ramp = torch.linspace(-2, 2, 6)

    def net(t):  # a fixed ramp along the last axis: not flip-equivariant there, symmetric elsewhere
        z = t + ramp
        return torch.cat([z, -z], dim=1)

    kw = dict(roi_size=(2, 4, 6), margin=0, tta=True, sw_batch_size=1, mode="constant")
    plain = torch.softmax(net(x), 1)
    expected = (plain + torch.flip(torch.softmax(net(torch.flip(x, (2,))), 1), (2,))) / 2
    assert torch.allclose(predict_tiles(net, x, tta_axes=[0], **kw), expected, atol=1e-6)
    assert not torch.allclose(predict_tiles(net, x, **kw), expected, atol=1e-3)


class SidedNet(torch.nn.Module):
    """Logits of (background, left, right) for (N, 1, *spatial) windows: foreground (> 0.5) is
    "left" in the first half of spatial axis ``axis`` of the window, "right" in the second: a
    network that learned an organ's side from where it lies, as a trained one does."""

    def __init__(self, axis: int = 0) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        fg = (w[:, :1] > 0.5).float()
        n = w.shape[2 + self.axis]
        shape = [1] * w.ndim
        shape[2 + self.axis] = n
        first = (torch.arange(n) < n // 2).float().view(shape)
        return 20 * torch.cat([1 - fg, fg * first, fg * (1 - first)], dim=1)


def two_organs(shape: tuple[int, ...] = (16, 8, 6)) -> tuple[torch.Tensor, torch.Tensor]:
    """An image with an organ in each half of axis 0, and its labels: 1 (left) in the first half, 2 (right)."""
    label = torch.zeros(shape, dtype=torch.long)
    label[2:5, 2:6], label[10:14, 1:5] = 1, 2
    return (label > 0).float()[None, None], label


def test_lateral_pairs_swap_the_left_right_flip_back_so_tta_keeps_the_sides():
    """Flip TTA along the patient's left-right axis shows the network a mirrored patient: it calls
    the left organ right. With ``lateral_pairs`` the flipped pass's left and right probabilities are
    swapped back and the average keeps each organ's side; without them the sides are averaged away."""
    x, label = two_organs()
    kw = dict(roi_size=tuple(label.shape), margin=0, tta=True, sw_batch_size=1)
    net = SidedNet()
    plain = torch.softmax(predict_tiles(net, x, roi_size=kw["roi_size"], margin=0), 1)
    assert torch.equal(plain.argmax(1)[0], label)  # the network itself is right
    for axes in ([0], None):  # the left-right flip alone, and every flip
        swapped = predict_tiles(net, x, tta_axes=axes, lateral_pairs=[(1, 2)], **kw)
        torch.testing.assert_close(swapped, plain, atol=1e-6, rtol=0)
        mixed = predict_tiles(net, x, tta_axes=axes, **kw)
        assert torch.allclose(mixed[0, 1][label > 0], torch.tensor(0.5), atol=1e-6)  # left and right averaged
        assert torch.allclose(mixed[0, 2][label > 0], torch.tensor(0.5), atol=1e-6)
    ensemble = OverlapTileInferer(tta_axes=[0], lateral_pairs=[[1, 2]], **kw)(x, Ensemble([net, SidedNet()]))
    assert torch.equal(ensemble.argmax(1)[0], label)  # through a fold ensemble too
    untouched = predict_tiles(net, x, tta_axes=[1, 2], lateral_pairs=[(1, 2)], **kw)  # no left-right flip
    torch.testing.assert_close(untouched, plain, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="lateral_axis 3"):
        predict_tiles(net, x, lateral_pairs=[(1, 2)], lateral_axis=3, **kw)


def test_slice_inferer_swaps_on_the_in_plane_left_right_axis_only():
    from pipeline.slice_inference import SliceTileInferer

    x, label = two_organs()
    kw = dict(roi_size=(16, 8), margin=0, tta=True, tta_axes=[0], sw_batch_size=2, lateral_pairs=[[1, 2]])
    axial = SliceTileInferer(slice_axis=2, **kw)(x, SidedNet())  # (x, y) slices: axis 0 is left-right
    assert axial.shape == (1, 3, 16, 8, 6) and torch.equal(axial.argmax(1)[0], label)
    unpaired = SliceTileInferer(slice_axis=2, **{**kw, "lateral_pairs": None})(x, SidedNet())
    assert torch.allclose(unpaired[0, 1][label > 0], torch.tensor(0.5), atol=1e-6)
    across = SliceTileInferer(slice_axis=0, **{**kw, "roi_size": (8, 6)})  # (y, z) slices: no left-right flip
    assert across.kwargs["lateral_axis"] is None and SliceTileInferer(slice_axis=1, **kw).kwargs["lateral_axis"] == 0


def test_shift_window_moves_content_and_mirrors_the_uncovered_side():
    x = torch.arange(6.0).reshape(1, 1, 1, 1, 6)
    assert shift_window(x, 2, 2).flatten().tolist() == [2, 1, 0, 1, 2, 3]
    assert shift_window(x, 2, -2).flatten().tolist() == [2, 3, 4, 5, 4, 3]
    assert shift_window(x, 0, 0) is x
    with pytest.raises(ValueError, match="tta_shift 6"):
        shift_window(x, 2, 6)
    assert shift_offsets(3, 2) == [(0, 0), (0, 2), (0, -2), (1, 2), (1, -2), (2, 2), (2, -2)]
    assert shift_offsets(2, 0) == [(0, 0)]
    with pytest.raises(ValueError, match="tta_shift -1"):
        shift_offsets(3, -1)


def test_tta_shift_averages_shifted_passes_moved_back():
    """Shift TTA is exact for a shift-equivariant network (a pointwise one: each voxel's output
    depends on that voxel only, so every shifted pass moved back is the plain prediction), and
    for a network that is not (a fixed ramp along one axis) equals the per-voxel mean over the
    passes that cover each voxel, computed here by hand for 1D shifts along that axis."""
    x = torch.rand(1, 1, 5, 6, 7, generator=torch.Generator().manual_seed(0))
    kw = dict(roi_size=(5, 6, 7), margin=0, tta=True, sw_batch_size=1, mode="constant", tta_axes=[0])

    def pointwise(t):
        return torch.cat([t, 1 - 2 * t, t * t], dim=1)

    plain = predict_tiles(pointwise, x, **kw)
    assert torch.allclose(predict_tiles(pointwise, x, tta_shift=2, **kw), plain, atol=1e-6)

    ramp = torch.linspace(-3, 3, 7)
    calls = []

    def ramped(t):  # position along the last axis matters: shifts change the prediction
        calls.append(1)
        return torch.cat([t + ramp, -(t + ramp)], dim=1)

    def probs(t):
        return torch.softmax(ramped(t), 1)

    out = predict_tiles(ramped, x, tta_shift=1, **{**kw, "tta_axes": []})
    assert len(calls) == 7  # no flips, 1 + 2 x 3 shifts
    p0 = probs(x)
    # away from the borders of axes 0 and 1, the 4 passes shifted along them give p0 back
    acc, count = p0.clone() * 5, torch.full((7,), 5.0)
    for s in (1, -1):
        moved = probs(torch.roll(x, s, dims=4))  # interior voxels equal the mirror-filled shift
        if s > 0:
            acc[..., :6] += moved[..., 1:]
            count[:6] += 1
        else:
            acc[..., 1:] += moved[..., :6]
            count[1:] += 1
    expected = acc / count
    assert torch.allclose(out[..., 1:4, 1:5, 1:6], expected[..., 1:4, 1:5, 1:6], atol=1e-5)
    assert not torch.allclose(out, p0, atol=1e-3)


def test_tta_passes_of_a_small_batch_share_network_calls() -> None:
    """One window with 14 TTA passes (left-right flips x 7 shifts) runs in 4 network calls of up to
    sw_batch_size 4 windows instead of 14 calls of one, with the output of one call per pass
    (sw_batch_size 1); a batch that already fills sw_batch_size keeps one call per pass."""
    torch.manual_seed(0)
    net = UNet(3, 1, 3, channels=(4, 8), strides=(2,)).eval()
    sizes: list[int] = []

    def counted(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.shape[0])
        return net(t)

    x = torch.rand(1, 1, 12, 12, 12, generator=torch.Generator().manual_seed(1))
    kw = dict(roi_size=(12, 12, 12), margin=0, tta=True, tta_axes=[0], tta_shift=2)
    grouped = predict_tiles(counted, x, sw_batch_size=4, **kw)
    assert sizes == [4, 4, 4, 2]
    sizes.clear()
    single = predict_tiles(counted, x, sw_batch_size=1, **kw)
    assert sizes == [1] * 14
    assert torch.allclose(grouped, single, atol=1e-5)
    sizes.clear()
    long = torch.rand(1, 1, 12, 12, 40, generator=torch.Generator().manual_seed(2))
    predict_tiles(counted, long, **{**kw, "roi_size": (12, 12, 10)}, sw_batch_size=4, overlap=0.0)
    assert sizes == [4] * 14


@pytest.mark.slow
def test_compiled_equals_eager_and_pads_the_short_last_batch() -> None:
    torch.manual_seed(0)
    net = UNet(3, 1, 2, channels=(4, 8), strides=(2,)).eval()
    x = torch.rand(1, 1, 20, 16, 12)  # 3x1x1 windows of 12x16x12: one full batch of 2, one short
    eager = predict_tiles(net, x, (12, 16, 12), margin=0, sw_batch_size=2, channels_last=False)
    fast = predict_tiles(net, x, (12, 16, 12), margin=0, sw_batch_size=2, channels_last=False, compile=True)
    torch.testing.assert_close(fast, eager, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- overlap-tile tiling

def _pointwise(w: torch.Tensor) -> torch.Tensor:
    return torch.cat([w, w * w - 0.5, -w], dim=1)


def _box_net(spatial_dims: int, radius: int) -> torch.nn.Module:
    """A local network: ``radius`` stacked 3-wide box filters (zero padding inside the window, so a
    voxel within ``radius`` of a window face sees zeros), receptive-field radius ``radius``."""
    conv = torch.nn.Conv3d if spatial_dims == 3 else torch.nn.Conv2d
    layers = []
    for _ in range(radius):
        c = conv(1, 1, 3, padding=1, bias=False)
        torch.nn.init.constant_(c.weight, 1.0 / 3**spatial_dims)
        layers.append(c)
    body = torch.nn.Sequential(*layers).eval()

    class Net(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = body(x)
            return torch.cat([y, 1 - y], dim=1)

    return Net().eval()


SHAPES = {3: [(37, 29, 11), (5, 3, 2), (48, 32, 16)], 2: [(45, 29), (7, 5), (64, 16)]}
ROIS = {3: (16, 16, 8), 2: (16, 16)}


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("which", [0, 1, 2])  # not divisible by the step / smaller than the window / exact fit
def test_overlap_tile_pointwise_network_is_exact(dims: int, which: int) -> None:
    x = torch.rand(2, 1, *SHAPES[dims][which], generator=torch.Generator().manual_seed(which))
    for window, multiple in ((None, 1), (tuple(2 * r for r in ROIS[dims]), 8)):
        out = predict_tiles(_pointwise, x, ROIS[dims], tiling="overlap-tile", tile_margin=3, tile_window=window,
                            tile_multiple=multiple, sw_batch_size=3)
        assert out.shape == (2, 3, *x.shape[2:])
        assert torch.equal(out, _pointwise(x))


@pytest.mark.parametrize("size,roi,window,margin,multiple", [
    (100, 48, 96, 8, 16), (241, 48, 96, 8, 16), (37, 16, 16, 3, 1), (17, 16, 16, 3, 1), (5, 16, 16, 5, 1),
    (1, 8, 8, 2, 1), (43, 40, 48, 2, 8), (128, 32, 64, 5, 16), (10, 16, 32, 0, 16)])
def test_axis_tiles_cover_each_voxel_exactly_once_with_margin_context(size: int, roi: int, window: int,
                                                                       margin: int, multiple: int) -> None:
    w, tiles = axis_tiles(size, roi, window, margin, multiple)
    assert roi <= w <= max(window, roi) and (w % multiple == 0 or w == window)
    kept = [v for _, lo, hi, _ in tiles for v in range(lo, hi)]
    assert kept == list(range(size))  # consecutive, no gap, no overlap
    for start, lo, hi, stop in tiles:
        assert stop - start == w and lo - start >= margin and stop - hi >= margin


def test_axis_tiles_shrink_windows_to_fit_and_refuse_a_margin_that_leaves_nothing() -> None:
    assert axis_tiles(100, 48, 96, 8, 16)[0] == 80  # two windows of 80, not two of 96
    assert len(axis_tiles(100, 48, 48, 8, 16)[1]) == 4  # the ROI keeps 32: four windows
    assert axis_tiles(35, 40, 48, 2, 8) == (40, [(-2, 0, 35, 38)])  # one window: the ROI
    with pytest.raises(ValueError, match="leaves nothing"):
        axis_tiles(50, 16, 16, 8)


@pytest.mark.parametrize("dims", [2, 3])
def test_overlap_tile_predicts_every_voxel_once_from_its_own_window(dims: int) -> None:
    """A network that writes its call number into each window: every voxel carries the number of the
    one window whose kept box holds it, the boxes partition the volume, and no window is wasted."""
    x = torch.rand(1, 1, *SHAPES[dims][0])
    calls: list[int] = []

    def numbered(w: torch.Tensor) -> torch.Tensor:
        ids = torch.arange(len(calls), len(calls) + w.shape[0], dtype=torch.float32) + 1
        calls.extend(range(w.shape[0]))
        return ids.view(-1, 1, *[1] * dims).expand(-1, 2, *w.shape[2:]).clone()

    out = predict_tiles(numbered, x, ROIS[dims], tiling="overlap-tile", tile_margin=2, sw_batch_size=2)
    _, tiles = tile_plan(x.shape[2:], ROIS[dims], ROIS[dims], [2] * dims, [16] * dims)
    boxes = list(itertools.product(*tiles))
    assert len(calls) == len(boxes) == math.prod(len(t) for t in tiles)
    for i, box in enumerate(boxes):
        region = out[(0, 0, *(slice(lo, hi) for _, lo, hi, _ in box))]
        assert torch.all(region == i + 1)
    assert sorted(torch.unique(out[0, 0]).tolist()) == list(range(1, len(boxes) + 1))


@pytest.mark.parametrize("dims", [2, 3])
def test_overlap_tile_context_is_neighbours_inside_and_mirror_at_the_border(dims: int) -> None:
    """A network with receptive-field radius 2: with a margin of 2 or more every kept voxel sees its
    true neighbours, and beyond the border the mirror image, so the result is the network applied
    to the whole reflect-padded image, exactly; a margin of 1 is not enough."""
    shape = (42, 28, 12)[:dims]  # with a margin of 1, windows of 16 (8) keep 14 (6): exactly 1 of context
    x = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(1))
    net = _box_net(dims, radius=2)
    with torch.no_grad():
        whole = net(mirror_pad(x, [(2, 2)] * dims))[(slice(None), slice(None), *[slice(2, -2)] * dims)]
    for margin in (2, 3):
        out = predict_tiles(net, x, ROIS[dims], tiling="overlap-tile", tile_margin=margin, tile_multiple=1)
        torch.testing.assert_close(out, whole, atol=1e-6, rtol=0)
    short = predict_tiles(net, x, ROIS[dims], tiling="overlap-tile", tile_margin=1, tile_multiple=1)
    assert (short - whole).abs().max() > 1e-3


@pytest.mark.parametrize("dims", [2, 3])
def test_overlap_tile_agrees_with_blend_for_a_receptive_field_inside_the_margin(dims: int) -> None:
    """Blend mode averages in windows whose faces cut the receptive field, with Gaussian weights
    that are small there: close to the whole-image result, not equal. Overlap-tile equals it."""
    x = torch.rand(1, 1, *SHAPES[dims][2], generator=torch.Generator().manual_seed(2))
    net = _box_net(dims, radius=1)
    with torch.no_grad():
        whole = net(mirror_pad(x, [(1, 1)] * dims))[(slice(None), slice(None), *[slice(1, -1)] * dims)]
    tile = predict_tiles(net, x, ROIS[dims], tiling="overlap-tile", tile_margin=2)
    blend = predict_tiles(net, x, ROIS[dims], tiling="blend", margin=2, overlap=0.5)
    torch.testing.assert_close(tile, whole, atol=1e-6, rtol=0)
    assert (blend - tile).abs().mean() < 1e-2 and (blend - tile).abs().max() < 0.2  # 3D: roi 8, sigma 1


@pytest.mark.parametrize("dims", [2, 3])
def test_overlap_tile_keeps_flip_and_shift_tta(dims: int) -> None:
    """Flip TTA with a flip-equivariant local network and shift TTA with a pointwise one give the
    softmax of the plain prediction, as in blend mode; shifts move content by less than the margin."""
    x = torch.rand(1, 1, *SHAPES[dims][0], generator=torch.Generator().manual_seed(3))
    net = _box_net(dims, radius=1)
    kw = dict(roi_size=ROIS[dims], tiling="overlap-tile", tile_margin=3, tile_multiple=1)
    plain = predict_tiles(net, x, **kw)
    inferer = OverlapTileInferer(tta=True, **kw)
    assert inferer.outputs_probabilities
    torch.testing.assert_close(inferer(x, net), torch.softmax(plain, 1), atol=1e-5, rtol=0)
    shifted = predict_tiles(_pointwise, x, tta=True, tta_shift=2, tta_axes=[0], **kw)
    torch.testing.assert_close(shifted, torch.softmax(_pointwise(x), 1), atol=1e-6, rtol=0)


def test_tiling_is_checked_and_metatensors_keep_their_meta() -> None:
    from monai.data import MetaTensor

    with pytest.raises(ValueError, match="tiling 'tiles'"):
        OverlapTileInferer((8, 8, 8), tiling="tiles")
    with pytest.raises(ValueError, match="tiling 'tiles'"):
        predict_tiles(_pointwise, torch.rand(1, 1, 8, 8, 8), (8, 8, 8), tiling="tiles")
    x = MetaTensor(torch.rand(1, 1, 9, 10, 11), affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    out = OverlapTileInferer((8, 8, 8), tiling="overlap-tile", tile_margin=1, tile_multiple=1)(x, _pointwise)
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, x.affine)
    assert torch.equal(out.as_tensor(), _pointwise(x.as_tensor()))


# ---------------------------------------------------------------- benchmarks/gpu_check.sh

GPU_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def test_gpu_check_script_parses_and_says_so_without_cuda() -> None:
    import subprocess

    assert subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: gpu_check.sh would run for minutes")
    r = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "gpu_check: skipped" in r.stdout and "no CUDA GPU" in r.stdout


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_step(tmp_path: Path) -> None:
    """The same steps on the CPU with tiny sizes: training with forced fp16 and bf16 autocast, a
    one-process torchrun (gloo), inference in each tiling mode against MONAI with Dice, the table."""
    import subprocess

    out = tmp_path / "table.md"
    r = subprocess.run(["bash", str(GPU_CHECK), "--cpu-smoke", "--out", str(out)], capture_output=True, text=True,
                       timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    table = out.read_text()
    for row in ("monai fp32", "blend amp", "overlap-tile amp", "train_float16", "train_bfloat16", "nccl"):
        assert row in table, table
