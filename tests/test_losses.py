"""BoundaryWeightedDiceCELoss and prepare_batch_with_weight: maths, gradients, autocast, engines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from pipeline.losses import BoundaryWeightedDiceCELoss, prepare_batch_with_weight, split_target


def case(shape, classes=3, seed=0, dtype=torch.float32, batch=2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((batch, classes, *shape), generator=g, dtype=dtype)
    label = torch.randint(0, classes, (batch, 1, *shape), generator=g).to(dtype)
    weight = 1 + 9 * torch.rand((batch, 1, *shape), generator=g, dtype=dtype)
    return logits, label, weight


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 3)])
def test_gradcheck_float64(shape):
    logits, label, weight = case(shape, dtype=torch.float64, batch=1)
    loss = BoundaryWeightedDiceCELoss(lambda_dice=0.7, lambda_ce=1.3)
    target = torch.cat([label, weight], dim=1)
    assert torch.autograd.gradcheck(lambda x: loss(x, target), (logits.requires_grad_(),))


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("shape", [(6, 7), (4, 5, 3)])
def test_equals_monai_dice_ce_when_weights_are_one(shape, include_background):
    logits, label, _ = case(shape)
    ours = BoundaryWeightedDiceCELoss(lambda_dice=0.6, lambda_ce=1.5, include_background=include_background)
    ref = DiceCELoss(to_onehot_y=True, softmax=True, include_background=include_background,
                     lambda_dice=0.6, lambda_ce=1.5)(logits, label)
    assert ours(logits, label).item() == pytest.approx(ref.item(), abs=1e-5)
    ones = torch.cat([label, torch.ones_like(label)], dim=1)
    assert ours(logits, ones).item() == pytest.approx(ref.item(), abs=1e-5)


def test_cross_entropy_is_the_weighted_mean():
    logits, label, weight = case((5, 6))
    loss = BoundaryWeightedDiceCELoss(lambda_dice=0.0)(logits, torch.cat([label, weight], 1))
    ce = F.cross_entropy(logits, label[:, 0].long(), reduction="none")
    assert loss.item() == pytest.approx(((weight[:, 0] * ce).sum() / weight.sum()).item(), rel=1e-6)


def test_weight_scales_the_gradient_where_it_is_large():
    logits, label, _ = case((6, 6))
    weight = torch.ones_like(label)
    weight[0, 0, 2, 3] = 10.0
    loss = BoundaryWeightedDiceCELoss(lambda_dice=0.0)

    def grad(target):
        x = logits.clone().requires_grad_()
        loss(x, target).backward()
        return x.grad.abs().sum(dim=1)  # per voxel

    plain, weighted = grad(label), grad(torch.cat([label, weight], 1))
    ratio = (weighted[0, 2, 3] / weighted[0, 0, 0]) / (plain[0, 2, 3] / plain[0, 0, 0])
    assert ratio.item() == pytest.approx(10.0, rel=1e-5)


def test_cpu_bf16_autocast_computes_in_float32():
    logits, label, weight = case((8, 8))
    x = logits.to(torch.bfloat16).requires_grad_()
    target = torch.cat([label, weight], 1)
    loss = BoundaryWeightedDiceCELoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(x, target)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(x.grad.float()).all()
    assert value.item() == pytest.approx(loss(x.detach().float(), target).item(), abs=1e-6)


def test_deep_supervision_list_and_stacked():
    logits, label, weight = case((8, 8))
    target = torch.cat([label, weight], 1)
    low = torch.randn(2, 3, 4, 4)
    loss = BoundaryWeightedDiceCELoss()
    expected = (loss(logits, target) + 0.5 * loss(low, target[:, :, ::2, ::2])) / 1.5
    assert loss([logits, low], target).item() == pytest.approx(expected.item(), rel=1e-6)
    up = F.interpolate(low, size=(8, 8))
    stacked = torch.stack([logits, up], dim=1)  # DynUNet's B×S×C×H×W
    assert loss(stacked, target).item() == pytest.approx(((loss(logits, target) + 0.5 * loss(up, target)) / 1.5).item(), rel=1e-6)


def test_bad_targets_raise():
    logits, label, weight = case((4, 4))
    with pytest.raises(ValueError, match="1 channel"):
        BoundaryWeightedDiceCELoss()(logits, torch.cat([label, weight, weight], 1))
    with pytest.raises(ValueError, match="does not match"):
        BoundaryWeightedDiceCELoss()(logits, label[:, :, :3])
    with pytest.raises(ValueError, match="same shape|B×1"):
        prepare_batch_with_weight({"image": logits, "label": label, "weight": weight[:, :, :3]})


def test_prepare_batch_without_weight_is_the_default():
    image, label = torch.rand(2, 1, 4, 4), torch.ones(2, 1, 4, 4, dtype=torch.uint8)
    out_image, target = prepare_batch_with_weight({"image": image, "label": label})
    assert torch.equal(out_image, image) and torch.equal(target, label)
    _, target = prepare_batch_with_weight({"image": image, "label": label, "weight": 3 * torch.ones(2, 1, 4, 4)})
    lab, w = split_target(target)
    assert target.dtype == torch.float32 and torch.equal(lab, label.float()) and torch.all(w == 3)


def test_prepare_batch_with_weight_drops_meta_tensors():
    from monai.data import MetaTensor

    affine = torch.diag(torch.tensor([2.0, 3.0, 1.0]))
    image = MetaTensor(torch.rand(2, 1, 4, 4), affine=affine)
    label = MetaTensor(torch.ones(2, 1, 4, 4), affine=affine)
    out_image, target = prepare_batch_with_weight({"image": image, "label": label, "weight": torch.ones(2, 1, 4, 4)})
    assert type(out_image) is torch.Tensor and type(target) is torch.Tensor
    assert torch.equal(out_image, image.as_tensor())


def test_two_iterations_in_a_real_supervised_trainer():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(4):
        label = (torch.rand(1, 16, 16, generator=g) > 0.6).float()
        data.append({"image": label + 0.3 * torch.rand(1, 16, 16, generator=g), "label": label,
                     "weight": 1 + 5 * torch.rand(1, 16, 16, generator=g)})
    net = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0)
    before = [p.detach().clone() for p in net.parameters()]
    losses = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=DataLoader(data, batch_size=2),
        network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=BoundaryWeightedDiceCELoss(), prepare_batch=prepare_batch_with_weight, decollate=False,
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    trainer.run()
    assert trainer.state.iteration == 2 and len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert trainer.state.output["label"].shape == (2, 2, 16, 16)  # label and weight channels
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
