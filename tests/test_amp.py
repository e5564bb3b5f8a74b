"""pipeline.amp: the one precision policy, and the bf16 path measured against fp32 where it runs.

Every other test that compares numbers says its precision (``amp`` false, or both sides under
the same policy); this file is where bf16 itself is checked. ``pytest --cpu-bf16 on`` forces the
policy on a CPU without native bf16 (emulated: slower, same numerics), ``off`` turns it off.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.amp import CPU_BF16_ENV, autocast_dtype, autocast_inferer, cpu_has_bf16, cuda_amp, grad_scaler

ROOT = Path(__file__).resolve().parents[1]
BF16_AGREEMENT_FLOOR = 0.99  # argmax agreement of bf16 with fp32 on a phantom CT, shipped weights


def test_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    for forced, cpu in (("1", torch.bfloat16), ("0", None)):
        monkeypatch.setenv(CPU_BF16_ENV, forced)
        assert cpu_has_bf16() is (forced == "1")
        assert autocast_dtype("cpu", True) == cpu
        assert autocast_dtype("cpu", False) is None
        assert not cuda_amp("cpu", cpu)
    assert autocast_dtype("cuda", False) is None
    assert cuda_amp("cuda", torch.float16) and not cuda_amp("cuda", None)
    assert not grad_scaler("cpu", torch.bfloat16).is_enabled()  # only CUDA fp16 scales its loss
    assert not grad_scaler("cuda", torch.bfloat16).is_enabled()
    assert not grad_scaler("cuda", None).is_enabled()


def test_training_inferer_autocasts_on_cpu_only() -> None:
    net = torch.nn.Conv3d(1, 2, 3, padding=1)
    x = torch.rand(1, 1, 8, 8, 8)
    plain = autocast_inferer(lambda i, n: n(i), "cpu", None)
    bf16 = autocast_inferer(lambda i, n: n(i), "cpu", torch.bfloat16)
    assert autocast_inferer(plain, "cuda", torch.bfloat16) is plain  # the trainer autocasts on CUDA
    with torch.no_grad():
        ref, low = plain(x, net), bf16(x, net)
    assert low.dtype == torch.float32 and torch.allclose(ref, low, atol=0.05) and not torch.equal(ref, low)


@pytest.mark.skipif(not cpu_has_bf16(), reason="the CPU bf16 policy is off (no AVX512-BF16/AMX, or --cpu-bf16 off); "
                                               "pytest --cpu-bf16 on runs it emulated")
def test_bf16_prediction_agrees_with_fp32(tmp_path: Path) -> None:
    """The shipped phantom model on an unseen phantom, bf16 autocast against fp32: the argmax
    agrees on at least BF16_AGREEMENT_FLOOR of the voxels, and bf16 really ran (outputs differ)."""
    from pipeline.bundle import get, load_bundle
    from pipeline.predict_io import load_weights
    from pipeline.synthetic import write_dataset

    bundle = ROOT / "bundles" / "phantom_ct_3d"
    manifest = write_dataset("ct3d", 1, tmp_path, seed=1000, shape=(64, 64, 24))
    parser = load_bundle(bundle, ("common.json", "inference.json"), {"device": "$torch.device('cpu')"})
    net = load_weights(get(parser, "network_def"), bundle / "models" / "model.pt").eval()
    image = get(parser, "preprocessing")({"image": str(next((manifest.parent / "imagesTr").iterdir()))})["image"]
    out = {}
    for amp in (False, True):
        inferer = get(load_bundle(bundle, ("common.json", "inference.json"), {"amp": amp}), "inferer")
        out[amp] = inferer(image[None], net)[0]
    agree = float((out[True].argmax(0) == out[False].argmax(0)).float().mean())
    assert agree >= BF16_AGREEMENT_FLOOR, agree
    assert not torch.equal(out[True], out[False])
    fg = out[False].argmax(0) > 0
    assert fg.sum() > 100  # the phantom has organs: agreement is not all background
    assert nib.aff2axcodes(np.asarray(image.affine)) == ("R", "A", "S")
