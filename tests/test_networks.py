"""Network builders: output shapes in 2D/3D, BasicUNet equivalence, parameter counts, errors."""

import pytest
import torch
from monai.networks.nets import BasicUNet

from pipeline.errors import UsageError
from pipeline.networks import _ClassicUNet, build_network, count_parameters


@pytest.mark.parametrize("name,kwargs", [
    ("unet", {"features": [8, 8, 16, 32, 64, 8]}),
    ("unet", {"features": [8, 16, 32, 8]}),
    ("resunet", {"channels": [8, 16, 32], "num_res_units": 1}),
    ("dynunet", {"filters": [8, 16, 32], "deep_supervision": True, "deep_supr_num": 1}),
])
@pytest.mark.parametrize("dims,shape", [(2, (2, 1, 32, 32)), (3, (1, 1, 32, 32, 16))])
def test_output_shape(name, kwargs, dims, shape):
    net = build_network(name, dims, 1, 4, **kwargs).eval()
    with torch.no_grad():
        out = net(torch.rand(shape))
    assert out.shape == (shape[0], 4, *shape[2:])


def test_classic_unet_is_basicunet_at_depth_4():
    feats = (8, 8, 16, 32, 64, 8)
    ours = _ClassicUNet(3, 1, 3, feats, ("relu", {"inplace": True}), "instance", True, 0.0, "deconv")
    ref = BasicUNet(3, 1, 3, feats, act="relu", norm="instance")
    assert count_parameters(ours) == count_parameters(ref)
    assert isinstance(build_network("unet", 3, 1, 3, features=feats), BasicUNet)
    # max-pool down and transposed-conv up, as in the paper
    kinds = {type(m).__name__ for m in ours.modules()}
    assert {"MaxPool3d", "ConvTranspose3d", "ReLU"} <= kinds


def test_parameter_counts_are_sane():
    small = count_parameters(build_network("unet", 3, 1, 4, features=[8, 8, 16, 32, 64, 8]))
    wide = count_parameters(build_network("unet", 3, 1, 4, features=[16, 16, 32, 64, 128, 16]))
    assert 50_000 < small < 1_000_000
    assert 3.5 < wide / small < 4.5  # conv weights scale with width squared
    # classic 2D U-Net of the paper: 64..1024 features, about 31 M parameters
    paper = count_parameters(build_network("unet", 2, 1, 2, features=[64, 128, 256, 512, 1024, 64]))
    assert 28e6 < paper < 35e6


def test_dynunet_deep_supervision_training_output_and_loss():
    from pipeline.losses import BoundaryWeightedDiceCELoss

    net = build_network("dynunet", 3, 1, 3, filters=[8, 16, 32], deep_supr_num=1).train()
    pred = net(torch.rand(2, 1, 32, 32, 16))
    assert pred.shape == (2, 2, 3, 32, 32, 16)  # [B, 1 + deep_supr_num, C, ...]
    target = torch.randint(0, 3, (2, 1, 32, 32, 16))
    loss = BoundaryWeightedDiceCELoss()(pred, target)  # takes the stacked heads as they are
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_unknown_network_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown"):
        build_network("vnet", 3, 1, 2)
    with pytest.raises(UsageError, match="spatial_dims"):
        build_network("unet", 4, 1, 2)
