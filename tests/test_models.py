"""Models: ResNet18+ACM placement, ImageNet weight loading (offline, faked), TwinNet (Eq. 2), Table 5 builders."""
import hashlib
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import osteo.models as om
import osteo.weights
from osteo.acm import ACM
from osteo.losses import twin_loss
from osteo.models import (MODEL_NAMES, TwinNet, TwinOutput, build_model, default_image_size, gradcam_layer,
                          imagenet_cache_path, load_imagenet_weights, resnet18_acm)
from osteo.weights import WeightsFile


def _acms(model):
    return [m for m in model.modules() if isinstance(m, ACM)]


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub dir; downloads fail (conftest points them at a refusing local port)."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def no_download(*args, **kwargs):
        raise AssertionError("a test tried to download weights through torch.hub")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "hub"


def _register(monkeypatch, path, *networks):
    """Make ``path`` the published checkpoint of ``networks``: its name carries its own sha256 prefix."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    stem = path.name.split("-")[0]
    named = path.with_name(f"{stem}-{digest[:8]}.pth")
    path.rename(named)
    wf = WeightsFile(f"https://example.invalid/{named.name}")
    for net in networks:
        monkeypatch.setitem(osteo.weights.WEIGHTS, net, wf)
    return named, digest


def _fake_resnet18_checkpoint(hub, monkeypatch, seed=123):
    """A random ResNet18 state dict in the cache, registered as ResNet18's published weights."""
    torch.manual_seed(seed)
    sd = torchvision.models.resnet18().state_dict()
    ck = hub / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    torch.save(sd, ck / "resnet18-0.pth")
    named, digest = _register(monkeypatch, ck / "resnet18-0.pth", "resnet18", "resnet18_acm")
    return sd, named, digest


# --- ResNet18 + ACM --------------------------------------------------------------------------------

def test_resnet18_acm_has_8_acm_modules_in_order():
    torch.manual_seed(0)
    m = resnet18_acm().eval()
    acms = _acms(m)
    assert [a.channels for a in acms] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert all(a.groups == 32 for a in acms)
    assert [a for layer in (m.layer1, m.layer2, m.layer3, m.layer4) for blk in layer for a in [blk.acm]] == acms
    assert m.pretrained_used is False
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        y = m(x)
        g, acm = m.features(x)
    assert y.shape == (2, 3) and torch.isfinite(y).all() and not torch.allclose(y[0], y[1])
    assert g.shape == (2, 512) and acm.shape == (2,)
    torch.testing.assert_close(m.fc(g), y, rtol=0, atol=0)


@pytest.mark.parametrize("layer,has_downsample", [("layer1", False), ("layer2", True)])
def test_acm_sits_on_the_residual_branch(layer, has_downsample):
    torch.manual_seed(0)
    m = resnet18_acm().eval()
    blk = getattr(m, layer)[0]
    assert (blk.downsample is not None) == has_downsample
    cin = blk.conv1.in_channels
    x = torch.randn(2, cin, 16, 16)
    with torch.no_grad():
        before, _ = blk(x)
        blk.acm.p2.weight.zero_()
        blk.acm.p2.bias.fill_(-1e4)  # P == 0: the residual branch contributes nothing
        after, _ = blk(x)
        identity = x if blk.downsample is None else blk.downsample(x)
    torch.testing.assert_close(after, F.relu(identity), rtol=0, atol=0)
    assert not torch.allclose(before, after)


def test_block_matches_torchvision_block_when_acm_is_identity():
    """With K == Q and P == 1 the ACM block computes exactly torchvision's BasicBlock (in float64:
    other kernels may order their sums differently; measured difference: 0)."""
    torch.manual_seed(0)
    m = resnet18_acm().double().eval()
    blk = m.layer3[0]
    ref = torchvision.models.resnet.BasicBlock(128, 256, stride=2, downsample=blk.downsample).double().eval()
    ref.load_state_dict({k: v for k, v in blk.state_dict().items() if not k.startswith("acm.")})
    with torch.no_grad():
        blk.acm.kq.weight[1::2] = blk.acm.kq.weight[0::2]
        blk.acm.kq.bias[1::2] = blk.acm.kq.bias[0::2]
        blk.acm.p2.weight.zero_()
        blk.acm.p2.bias.fill_(100.0)  # P = sigmoid(100) = 1 in float64
        x = torch.randn(2, 128, 8, 8, dtype=torch.float64)
        torch.testing.assert_close(blk(x)[0], ref(x), rtol=1e-12, atol=1e-12)


def test_resnet_keys_are_torchvision_keys():
    ours = set(resnet18_acm().state_dict())
    tv = set(torchvision.models.resnet18().state_dict())
    assert {k for k in ours if ".acm." not in k} == tv
    acm_keys = ours - tv
    assert len(acm_keys) == 8 * 6  # kq, p1, p2: weight + bias each
    res = resnet18_acm().load_state_dict({k: v for k, v in torchvision.models.resnet18().state_dict().items()
                                          if not k.startswith("fc.")}, strict=False)
    assert set(res.missing_keys) == acm_keys | {"fc.weight", "fc.bias"}
    assert res.unexpected_keys == []


# --- ImageNet weights: True / False / "auto", all offline -----------------------------------------

def test_auto_with_empty_cache_trains_from_scratch(hub_dir):
    with pytest.warns(UserWarning, match=r"resnet18-f37072fd.pth for resnet18_acm not available .*osteo weights import"):
        m = resnet18_acm(pretrained="auto")
    assert m.pretrained_used is False and m.imagenet_weights is None
    assert not os.path.exists(imagenet_cache_path(m, "resnet18_acm"))
    t = TwinNet(pretrained="auto")
    assert t.pretrained_used is False and t.imagenet_weights is None
    for name in MODEL_NAMES:
        kw = {"image_size": 32} if name == "vit_b_16" else {}
        assert build_model(name, pretrained="auto", **kw).pretrained_used is False, name
    ck = hub_dir / "checkpoints"
    assert not ck.exists() or not any(ck.iterdir())  # nothing half-downloaded left behind


def test_true_without_weights_raises_clear_error(hub_dir):
    with pytest.raises(RuntimeError, match=r"resnet18-f37072fd.pth: the ImageNet weights for resnet18_acm cannot be "
                                           r"had .*Connection refused.*osteo weights import.*pretrained=False"):
        resnet18_acm(pretrained=True)
    with pytest.raises(RuntimeError, match="efficientnet_b0_rwightman-7f5810bc.pth: .* cannot be had"):
        build_model("efficientnet_b0", pretrained=True)
    with pytest.raises(RuntimeError, match="xception-43020ad28.pth: the ImageNet weights for xception cannot be had"):
        build_model("xception", pretrained=True)


def test_false_never_touches_the_network(hub_dir, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("pretrained=False reached for the network")

    monkeypatch.setattr(osteo.weights, "_open", no_network)
    monkeypatch.setattr(osteo.weights, "obtain", no_network)
    for name in MODEL_NAMES:
        kw = {"image_size": 32} if name == "vit_b_16" else {}
        m = build_model(name, pretrained=False, **kw)
        assert m.pretrained_used is False and m.imagenet_weights is None
    assert TwinNet(pretrained=False, init="shared").imagenet_weights is None


def test_xception_url_is_timms():
    import timm

    assert osteo.weights.WEIGHTS["xception"].url == timm.create_model(om.XCEPTION_TIMM_NAME).pretrained_cfg["url"]


def test_cached_weights_load_non_strictly(hub_dir, monkeypatch):
    sd, named, digest = _fake_resnet18_checkpoint(hub_dir, monkeypatch)
    torch.manual_seed(0)
    m = resnet18_acm(pretrained="auto")
    assert m.pretrained_used is True
    assert m.imagenet_weights == {"file": named.name, "sha256": digest}
    msd = m.state_dict()
    for k, v in sd.items():
        if not k.startswith("fc."):
            assert torch.equal(msd[k], v), k
    assert m.fc.weight.shape == (3, 512)  # new head, fresh init
    # True finds the cached file (no download)
    assert torch.equal(resnet18_acm(pretrained=True).conv1.weight, sd["conv1.weight"])
    assert torch.equal(build_model("resnet18", pretrained="auto").layer4[1].bn2.running_var, sd["layer4.1.bn2.running_var"])
    t = TwinNet(pretrained="auto")
    assert t.pretrained_used is True and t.imagenet_weights["sha256"] == digest
    assert torch.equal(t.G_s.conv1.weight, sd["conv1.weight"]) and torch.equal(t.G_t.conv1.weight, sd["conv1.weight"])
    assert build_model("resnet18", pretrained=False).pretrained_used is False


def test_cached_file_with_wrong_hash_is_refused(hub_dir):
    path = imagenet_cache_path(build_model("efficientnet_b0"), "efficientnet_b0")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    for pretrained in ("auto", True):
        with pytest.raises(RuntimeError, match=r"efficientnet_b0_rwightman-7f5810bc.pth: sha256 [0-9a-f]{64} does not "
                                               r"match the published hash 7f5810bc\.\.\..*delete it"):
            build_model("efficientnet_b0", pretrained=pretrained)


def test_mismatching_checkpoint_raises(hub_dir, monkeypatch):
    m = build_model("efficientnet_b0")
    ck = hub_dir / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    torch.save({"features.0.0.weight": torch.zeros(1)}, ck / "effnet-0.pth")
    _register(monkeypatch, ck / "effnet-0.pth", "efficientnet_b0")
    with pytest.raises(RuntimeError, match="do not fit efficientnet_b0"):  # wrong shape
        load_imagenet_weights(m, "efficientnet_b0", "auto")
    for p in ck.iterdir():
        p.unlink()
    torch.save({"not.a.key": torch.zeros(1)}, ck / "effnet-0.pth")
    _register(monkeypatch, ck / "effnet-0.pth", "efficientnet_b0")
    with pytest.raises(RuntimeError, match=r"do not fit efficientnet_b0: missing \['features"):
        load_imagenet_weights(m, "efficientnet_b0", "auto")


def test_vit_position_embeddings_are_interpolated():
    torch.manual_seed(0)
    big = torchvision.models.vit_b_16(weights=None)
    small = build_model("vit_b_16", image_size=32)
    om._load_state(small, "vit_b_16", big.state_dict(), source="test")
    assert small.encoder.pos_embedding.shape == (1, 5, 768)
    torch.testing.assert_close(small.encoder.pos_embedding[:, 0], big.encoder.pos_embedding[:, 0])  # class token
    assert torch.equal(small.conv_proj.weight, big.conv_proj.weight)


def test_inception_pretrained_sets_transform_input():
    m = build_model("inception_v3", image_size=75)
    assert m.transform_input is False
    sd = {k: v for k, v in torchvision.models.inception_v3(weights=None, init_weights=False).state_dict().items()}
    om._load_state(m, "inception_v3", sd, source="test")  # AuxLogits.* and fc.* dropped without complaint
    assert m.transform_input is True


def test_bad_pretrained_value():
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        resnet18_acm(pretrained="yes")


# --- TwinNet (Eq. 2) ------------------------------------------------------------------------------

def _twin(**kw):
    torch.manual_seed(0)
    return TwinNet(**kw).eval()


def test_twin_fusion_is_eq2():
    model = _twin()
    xs, xt = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(xs, xt)
        assert isinstance(out, TwinOutput)
        assert out.g_s.shape == out.g_t.shape == (2, 512)
        torch.testing.assert_close(out.g_s, model.G_s(xs))
        torch.testing.assert_close(out.g_t, model.G_t(xt))
        torch.testing.assert_close(out.logits_s, model.head_s(out.g_s))
        torch.testing.assert_close(out.logits_t, model.head_t(out.g_t))
        assert float(model.alpha) == 0.5
        torch.testing.assert_close(out.logits_f, model.head_f(0.5 * out.g_s + 0.5 * out.g_t))
        assert not torch.allclose(out.g_s, out.g_t)  # two independently initialised backbones
        model.alpha.fill_(1.5)  # not clamped, like the paper
        out2 = model(xs, xt)
        torch.testing.assert_close(out2.logits_f, model.head_f(1.5 * out.g_s - 0.5 * out.g_t))
    assert model.G_s.layer4[-1].maps is gradcam_layer(model) and model.G_t.layer4[-1].maps is gradcam_layer(model, "t")
    assert isinstance(model.G_s.layer4[-1], om.BasicBlockACM)


def test_learnable_alpha_gets_gradient():
    model = _twin()
    assert "alpha" in dict(model.named_parameters())
    out = model(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64))
    twin_loss(out, torch.tensor([0, 2])).backward()
    assert model.alpha.grad is not None and model.alpha.grad.abs() > 0


def test_fixed_alpha_is_a_buffer():
    model = _twin(alpha=0.3, learn_alpha=False)
    assert "alpha" not in dict(model.named_parameters())
    assert "alpha" in dict(model.named_buffers()) and "alpha" in model.state_dict()
    assert model.alpha.requires_grad is False and float(model.alpha) == pytest.approx(0.3)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64))
        torch.testing.assert_close(out.logits_f, model.head_f(0.3 * out.g_s + 0.7 * out.g_t))


def test_acm_term_is_returned_and_sums_16_modules():
    """The twin's output carries the ACM term of THIS forward: the sum of every block's dp of both
    backbones (each block returns its own), also in the ModelOutput view (aux["acm"])."""
    model = _twin().double()
    xs, xt = torch.randn(3, 3, 64, 64, dtype=torch.float64), torch.randn(3, 3, 64, 64, dtype=torch.float64)
    dps = []
    hooks = [blk.register_forward_hook(lambda mod, inp, out: dps.append(out[1]))
             for net in (model.G_s, model.G_t) for blk in net.blocks()]
    with torch.no_grad():
        out = model(xs, xt)
    for h in hooks:
        h.remove()
    assert len(dps) == 16
    torch.testing.assert_close(out.acm, sum(dps), rtol=1e-12, atol=1e-15)
    assert out.acm.shape == (3,) and out.acm.abs().sum() > 0
    assert out.aux["acm"] is out.acm and out.main == "f" and list(out.logits) == ["s", "t", "f"]
    with torch.no_grad():
        other = model(xt, xs).acm  # another input: another term, nothing stale
    assert not torch.allclose(other, out.acm)
    with pytest.raises(RuntimeError, match="out.acm"):
        model.acm_term


# --- Table 5 builders -----------------------------------------------------------------------------

# Published ImageNet parameter counts (1000 classes) minus the head difference for 3 classes.
def _expected_params(name):
    head = {"resnet18": 512, "resnet18_acm": 512, "xception": 2048, "inception_v3": 2048,
            "efficientnet_b0": 1280, "vit_b_16": 768}[name]
    published = {"resnet18": 11_689_512, "resnet18_acm": 11_689_512 + 28_992, "xception": 22_855_952,
                 "inception_v3": 27_161_264 - 3_326_696,  # torchvision's count minus the auxiliary classifier
                 "efficientnet_b0": 5_288_548, "vit_b_16": 86_567_656 - (197 - 5) * 768}[name]  # ViT at 32 px: 5 tokens
    return published - 997 * (head + 1)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_build_model_each_name(name):
    size = {"inception_v3": 75, "vit_b_16": 32}.get(name, 64)
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, image_size=size).eval()
    assert model.pretrained_used is False
    assert sum(p.numel() for p in model.parameters()) == _expected_params(name)
    with torch.no_grad():
        y = model(torch.randn(2, 3, size, size))
    assert y.shape == (2, 3) and torch.isfinite(y).all()
    if name == "vit_b_16":
        assert model.heads.head.weight.abs().sum() == 0  # torchvision zero-initialises ViT's head
    else:
        assert not torch.allclose(y[0], y[1], rtol=1e-3, atol=0)
    assert isinstance(gradcam_layer(model), nn.Module)


def test_gradcam_layers():
    assert gradcam_layer(build_model("resnet18")) .__class__ is torchvision.models.resnet.BasicBlock
    inc = build_model("inception_v3")
    assert gradcam_layer(inc) is inc.Mixed_7c
    eff = build_model("efficientnet_b0")
    assert gradcam_layer(eff) is eff.features[-1]
    with pytest.raises(ValueError, match="no Grad-CAM layer"):
        gradcam_layer(nn.Linear(2, 2))


def test_build_model_errors_and_sizes():
    with pytest.raises(ValueError, match="unknown model 'resnet50'.*resnet18_acm.*vit_b_16"):
        build_model("resnet50")
    with pytest.raises(ValueError, match="divisible by its patch size 16"):
        build_model("vit_b_16", image_size=40)
    with pytest.raises(ValueError, match="at least 75 px"):
        build_model("inception_v3", image_size=64)
    assert [default_image_size(n) for n in MODEL_NAMES] == [224, 224, 299, 299, 224, 224]
    assert om.XCEPTION_TIMM_NAME == "legacy_xception"
