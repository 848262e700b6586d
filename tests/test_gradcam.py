"""Grad-CAM against captum's LayerGradCam, normalisation, targets, hook release and side effects."""
import pytest
import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

from osteo.gradcam import GradCAM, grad_cam
from osteo.models import TwinNet, build_model, gradcam_layer


@pytest.fixture(scope="module")
def twin():
    torch.manual_seed(0)
    return TwinNet().eval()


@pytest.fixture(scope="module")
def views():
    torch.manual_seed(1)
    return torch.randn(2, 3, 96, 96), torch.randn(2, 3, 96, 96)


def _minmax(cam):
    flat = cam.flatten(1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    span = hi - lo
    return torch.where(span > 0, (cam - lo) / span, torch.zeros_like(cam))  # an all-zero map stays zero


@pytest.mark.parametrize("branch", ["s", "t"])
def test_matches_captum_on_twinnet(twin, views, branch):
    fn = (lambda a, b: twin(a, b).logits_s) if branch == "s" else (lambda a, b: twin(a, b).logits_t)
    layer = gradcam_layer(twin, branch)
    target = torch.tensor([0, 2])
    ref = LayerGradCam(fn, layer).attribute(views, target=target, relu_attributions=True)  # (B, 1, 3, 3)
    raw = grad_cam(fn, layer, *views, target=target, normalize=False, upsample=False)
    assert raw.shape == (2, 3, 3) and raw.max() > 0
    # float32, one forward and backward of the same network: measured difference 0 here (1 and 2
    # threads, oneDNN on and off, AVX-512, AVX2 and plain kernels); the tolerances leave room for a
    # kernel that orders its sums differently (~1e-6 relative in float32)
    torch.testing.assert_close(raw, ref[:, 0], rtol=1e-4, atol=1e-6)
    full = grad_cam(fn, layer, *views, target=target)
    ref_full = _minmax(LayerAttribution.interpolate(ref, (96, 96), "bilinear")[:, 0])
    assert full.shape == (2, 96, 96)
    torch.testing.assert_close(full, ref_full, rtol=1e-4, atol=1e-5)


def test_range_and_target_forms(twin, views):
    fn = lambda a, b: twin(a, b).logits_f  # noqa: E731
    layer = twin.G_s.layer4[-1]
    cam = grad_cam(fn, layer, *views, target=1)
    assert cam.dtype == torch.float32 and not torch.isnan(cam).any()
    assert cam.min() >= 0 and cam.max() <= 1
    assert torch.allclose(cam.flatten(1).max(1).values, torch.ones(2))  # each non-zero map reaches 1
    assert torch.allclose(cam.flatten(1).min(1).values, torch.zeros(2))
    torch.testing.assert_close(grad_cam(fn, layer, *views, target=torch.tensor([1, 1])), cam)
    torch.testing.assert_close(grad_cam(fn, layer, *views, target=torch.tensor(1)), cam)
    torch.testing.assert_close(grad_cam(fn, layer, *views, target=[1, 1]), cam)
    # per-sample targets: row i equals the map of sample i alone with its own class
    mixed = grad_cam(fn, layer, *views, target=torch.tensor([0, 2]))
    alone = grad_cam(fn, layer, views[0][1:], views[1][1:], target=2)
    torch.testing.assert_close(mixed[1], alone[0], rtol=1e-4, atol=1e-5)  # batch of 2 vs 1: measured 0, see above
    assert not torch.allclose(mixed[0], cam[0])  # another class, another map
    with pytest.raises(ValueError, match=r"target classes must lie in \[0, 3\)"):
        grad_cam(fn, layer, *views, target=3)
    with pytest.raises(ValueError, match="target must be an int or 2 class indices"):
        grad_cam(fn, layer, *views, target=torch.tensor([0, 1, 2]))


def test_all_zero_map_stays_zero():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
    cam = grad_cam(model, model[1], torch.randn(2, 3, 10, 10), target=0)
    assert cam.shape == (2, 10, 10) and torch.equal(cam, torch.zeros(2, 10, 10))


def test_hooks_released_also_on_error(twin, views):
    layer = twin.G_s.layer4[-1]
    n_before = len(layer._forward_hooks)

    def broken(a, b):
        twin(a, b)
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        grad_cam(broken, layer, *views, target=0)
    assert len(layer._forward_hooks) == n_before
    with pytest.raises(ValueError):
        grad_cam(lambda a, b: twin(a, b).logits_s, layer, *views, target=7)
    assert len(layer._forward_hooks) == n_before
    with GradCAM(lambda a, b: twin(a, b).logits_s, layer) as cam:
        assert len(layer._forward_hooks) == n_before + 1
        cam(*views, target=0)
    assert len(layer._forward_hooks) == n_before
    with pytest.raises(RuntimeError, match="closed"):
        cam(*views, target=0)


def test_no_side_effects_on_the_model():
    torch.manual_seed(0)
    views = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    model = TwinNet()
    model.eval()
    model.G_t.requires_grad_(False)  # a partly frozen model
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fn = lambda a, b: model(a, b).logits_s  # noqa: E731
    with torch.no_grad():  # also works when called under no_grad
        cam = grad_cam(fn, model.G_s.layer4[-1], *views, target=0)
    assert cam.max() == 1
    assert model.training is False and all(not m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # a fully frozen copy gives the same map
    model.requires_grad_(False)
    torch.testing.assert_close(grad_cam(fn, model.G_s.layer4[-1], *views, target=0), cam)
    model.train()
    grad_cam(fn, model.G_s.layer4[-1], *views, target=0)
    assert model.training is True


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("xception", 40), ("efficientnet_b0", 64), ("vit_b_16", 32)])
def test_other_models_give_maps(name, size):
    torch.manual_seed(0)
    model = build_model(name, image_size=size).eval()
    if name == "vit_b_16":
        nn.init.normal_(model.heads.head.weight)  # torchvision's zero-initialised head gives no gradient
    x = torch.randn(2, 3, size, size)
    cam = grad_cam(model, gradcam_layer(model), x, target=torch.tensor([0, 1]))
    assert cam.shape == (2, size, size) and not torch.isnan(cam).any()
    assert cam.min() >= 0 and cam.max() <= 1 and cam.max() == 1
    if name != "vit_b_16":  # captum has no token reshaping; compare the conv nets
        ref = LayerGradCam(model, gradcam_layer(model)).attribute(x, target=torch.tensor([0, 1]), relu_attributions=True)
        raw = grad_cam(model, gradcam_layer(model), x, target=torch.tensor([0, 1]), normalize=False, upsample=False)
        torch.testing.assert_close(raw, ref[:, 0], rtol=1e-4, atol=1e-6)
