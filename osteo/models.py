"""Networks: ResNet18+ACM, the proposed twin network (Eq. 2) and the single-input baselines of Table 5.

Architecture and weights are kept apart: builders construct from scratch, then one function,
:func:`load_imagenet_weights`, optionally loads ImageNet weights into them (design section 3: ``pretrained``
is True, False or "auto"; :mod:`osteo.weights` finds, downloads and verifies the files). Every built
model carries ``model.pretrained_used`` (bool) and ``model.imagenet_weights`` (file and sha256, or None).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock, ResNet

from . import weights
from .acm import ACM, acm_block, backbone_features, resnet_stem
from .grouped import grouped_twin_forward

__all__ = [
    "MODELS", "MODEL_NAMES", "TWIN_INITS", "XCEPTION_TIMM_NAME", "BasicBlockACM", "ModelOutput", "ModelSpec",
    "ResNetACM", "TwinNet", "TwinOutput", "build_model", "default_image_size", "fuse", "gradcam_layer",
    "imagenet_cache_path", "load_imagenet_weights", "model_spec", "register_model", "resnet18_acm", "run_model",
    "scaled_image_size",
]

#: Single-input models of Table 5 that :func:`build_model` knows ("twin" is :class:`TwinNet`).
MODEL_NAMES = ("resnet18", "resnet18_acm", "xception", "inception_v3", "efficientnet_b0", "vit_b_16")

#: timm's name for the classic Xception of Chollet (2017) (ported Keras/Cadene weights). timm's
#: ``xception41/65/71`` are the "aligned" DeepLab variants, not the network the paper names.
XCEPTION_TIMM_NAME = "legacy_xception"

# Checkpoint keys that are not loaded: the 1000-class ImageNet heads (our heads are new) and
# Inception's auxiliary classifier (we build Inception-v3 without it).
_HEAD_PREFIXES = {
    "resnet18": ("fc.",), "resnet18_acm": ("fc.",), "xception": ("fc.",),
    "inception_v3": ("fc.", "AuxLogits."), "efficientnet_b0": ("classifier.",), "vit_b_16": ("heads.",),
}
_MIN_SIZE = {"inception_v3": 75}


def _check_pretrained(pretrained) -> None:
    if not (pretrained is True or pretrained is False or pretrained == "auto"):
        raise ValueError(f"osteo/models.py: pretrained must be True, False or 'auto', got {pretrained!r}")


def imagenet_cache_path(model: nn.Module, arch: str) -> str:
    """Where torch's hub cache keeps (or would keep) the ImageNet checkpoint of ``arch``."""
    return str(weights.cache_path(arch))


def load_imagenet_weights(model: nn.Module, arch: str, pretrained) -> bool:
    """Load ImageNet weights into ``model`` (built from scratch by a builder here); returns whether it did.

    ``pretrained``: False -> nothing, and never the network; True -> the weights from the torch
    cache, downloaded there when missing (:class:`osteo.weights.WeightsError`, a RuntimeError, when
    they cannot be had); "auto" -> the same, but when they cannot be had the model stays as built
    (from scratch) with a warning that says why and how to get them. Files are used only when their
    sha256 matches the published hash (:mod:`osteo.weights`). Loading is non-strict: the ImageNet
    heads are dropped (our heads keep their fresh init) and the only keys allowed to stay missing
    are those heads and the ACM modules; anything else is a RuntimeError. ViT position embeddings
    are interpolated when the image size differs from 224; Inception-v3 gets ``transform_input=True``
    as torchvision sets for these weights. Sets ``model.pretrained_used`` and
    ``model.imagenet_weights`` (``{"file": name, "sha256": hex}`` of the file loaded, or None).
    """
    _check_pretrained(pretrained)
    model.pretrained_used, model.imagenet_weights = False, None
    if pretrained is False:
        return False
    found = weights.obtain(arch, required=pretrained is True)
    if found is None:
        return False
    path, digest = found
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a verified file should always load; say which one did not
        raise RuntimeError(f"{path}: ImageNet weights could not be read ({type(e).__name__}: {e})") from e
    _load_state(model, arch, state, source=str(path))
    model.pretrained_used, model.imagenet_weights = True, {"file": path.name, "sha256": digest}
    return True


def _load_state(model: nn.Module, arch: str, state: dict, source: str) -> None:
    heads = _HEAD_PREFIXES[arch]
    state = {k: v for k, v in state.items() if not k.startswith(heads)}
    if arch == "vit_b_16" and state["encoder.pos_embedding"].shape != model.encoder.pos_embedding.shape:
        state = tvm.vision_transformer.interpolate_embeddings(model.image_size, model.patch_size, state)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even when not strict
        raise RuntimeError(f"osteo/models.py: ImageNet weights {source} do not fit {arch}: {e}") from e
    bad_missing = [k for k in result.missing_keys if not k.startswith(heads) and ".acm." not in k]
    if bad_missing or result.unexpected_keys:
        raise RuntimeError(f"osteo/models.py: ImageNet weights {source} do not fit {arch}: missing "
                           f"{bad_missing[:5]} ({len(bad_missing)}), unexpected {result.unexpected_keys[:5]} "
                           f"({len(result.unexpected_keys)})")
    if arch == "inception_v3":
        model.transform_input = True  # the Google weights expect inputs in [-1, 1]; ours are ImageNet-normalised


# ---- the ResNet18+ACM networks ---------------------------------------------------------------------

def fuse(alpha, g_s: torch.Tensor, g_t: torch.Tensor) -> torch.Tensor:
    """Eq. (2): the fused feature ``g = alpha * g_s + (1 - alpha) * g_t`` read by the head F."""
    return alpha * g_s + (1 - alpha) * g_t


class BasicBlockACM(BasicBlock):
    """torchvision's BasicBlock with an ACM on the residual branch after ``bn2``, before the identity is added.

    Our placement for ResNet18 (design section 2; the official ACM code has Bottleneck ResNets only). The
    block's own parameter names are torchvision's, so ImageNet weights load into it unchanged. Its
    forward returns ``(output, dp)``: the block's output and its ACM term (B,).
    """

    acm_groups = 32

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.acm = ACM(self.bn2.num_features, groups=self.acm_groups)
        self.maps = nn.Identity()  # the block's output maps as one tensor: the Grad-CAM layer (no weights)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, dp = acm_block(x, self.conv1, self.bn1, self.conv2, self.bn2, self.acm, self.downsample)
        return self.maps(y), dp


class ResNetACM(ResNet):
    """ResNet of :class:`BasicBlockACM` blocks; state-dict keys are torchvision's ResNet's.

    :meth:`features` returns the pooled feature and the ACM term (the (B,) sum of ``dp`` over the
    blocks); ``forward`` returns ``fc`` of the feature (the logits, or the feature itself when
    ``fc`` is the identity, as in the twin's backbones).
    """

    def blocks(self) -> list:
        return [b for layer in (self.layer1, self.layer2, self.layer3, self.layer4) for b in layer]

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, dps = backbone_features(x, functools.partial(resnet_stem, conv1=self.conv1, bn1=self.bn1), self.blocks())
        return g, torch.stack(dps).sum(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x)[0])


def _resnet18_acm(num_classes: int, pretrained, features_only: bool) -> ResNetACM:
    model = ResNetACM(BasicBlockACM, [2, 2, 2, 2], num_classes=num_classes)
    if features_only:
        model.fc = nn.Identity()  # forward returns the pooled 512-d feature g
    model.num_features = 512
    load_imagenet_weights(model, "resnet18_acm", pretrained)
    return model


def resnet18_acm(num_classes: int = 3, pretrained=False) -> ResNetACM:
    """ResNet18 with one ACM per BasicBlock (8 modules: 64, 64, 128, 128, 256, 256, 512, 512 channels; groups 32).

    State-dict keys of the ResNet part are torchvision's, so ImageNet weights load non-strictly with
    only the ACM keys (and the new ``fc``) missing.
    """
    return _resnet18_acm(num_classes, pretrained, features_only=False)


#: How the twin's two backbones start (``TwinNet(init=...)``, ``TrainConfig.init``).
TWIN_INITS = ("independent", "shared", "imagenet")


def check_init(init, pretrained=None) -> None:
    """ValueError for an unknown ``init``, or for ``init="imagenet"`` with ``pretrained=False``."""
    if init not in TWIN_INITS:
        raise ValueError(f"osteo/models.py: init must be one of {', '.join(map(repr, TWIN_INITS))}, got {init!r}")
    if init == "imagenet" and pretrained is False:
        raise ValueError("osteo/models.py: init='imagenet' starts both branches from ImageNet weights; "
                         "pretrained=False contradicts it (use init='shared' for a random shared start)")


class ModelOutput(NamedTuple):
    """What every network of the kit returns (:func:`run_model`): the one interface that training,
    evaluation, prediction and Grad-CAM use.

    ``logits``: head name -> (B, K) logits, in the order of their cross-entropy terms;
    ``features``: name -> (B, D) pooled features (Eq. 4's L_dis pairs them); ``aux``: name -> (B,)
    auxiliary terms of this forward (``"acm"``: ACM's orthogonality term summed over the modules);
    ``main``: the head that makes the prediction.
    """

    logits: dict
    features: dict
    aux: dict
    main: str = "main"


class TwinOutput(NamedTuple):
    """Outputs of :class:`TwinNet`: logits of G_s, G_t and the fused head F (the prediction), g_s, g_t,
    and ``acm``, the (B,) ACM term of this forward summed over the 16 modules of both backbones.

    It offers the :class:`ModelOutput` view too (``logits``, ``features``, ``aux``, ``main``).
    """

    logits_s: torch.Tensor
    logits_t: torch.Tensor
    logits_f: torch.Tensor
    g_s: torch.Tensor
    g_t: torch.Tensor
    acm: torch.Tensor | None = None

    @property
    def logits(self) -> dict:
        return {"s": self.logits_s, "t": self.logits_t, "f": self.logits_f}

    @property
    def features(self) -> dict:
        return {"g_s": self.g_s, "g_t": self.g_t}

    @property
    def aux(self) -> dict:
        return {} if self.acm is None else {"acm": self.acm}

    @property
    def main(self) -> str:
        return "f"


class TwinNet(nn.Module):
    """The proposed network, Eq. (2): ``G_s(x_s)``, ``G_t(x_t)`` (ResNet18+ACM backbones giving 512-d
    pooled features ``g_s``, ``g_t``), their heads ``head_s``, ``head_t``, and ``head_f`` (F) on
    ``g = alpha * g_s + (1 - alpha) * g_t``.

    ``alpha`` is an ``nn.Parameter`` (initial value ``alpha``) when ``learn_alpha``, else a buffer
    (fixed; Table 4); ``model.alpha`` is the tensor in both cases. Like the paper, alpha is not
    clamped to [0, 1].

    ``init`` says how G_s and G_t start (see :data:`TWIN_INITS`): ``"independent"``, two random
    initialisations, so channel k of g_s and of g_t are unrelated at the start; ``"shared"``, G_t
    starts as a copy of G_s (every backbone weight equal, so cos(g_s, g_t) = 1 on one view): the
    offline stand-in for the paper's ``"imagenet"``, both from ImageNet weights (which needs them,
    as ``pretrained=True`` does). With ``pretrained`` True or "auto", ImageNet weights that load
    replace the ResNet part of both branches under any ``init`` (``model.imagenet_weights`` says).
    The forward returns a :class:`TwinOutput`, with ``acm`` the (B,) sum of ACM's ``dp`` over both
    backbones (:func:`osteo.losses.acm_penalty`; not part of Eq. 5).
    """

    def __init__(self, num_classes: int = 3, alpha: float = 0.5, learn_alpha: bool = True, pretrained=False,
                 init: str = "independent"):
        super().__init__()
        check_init(init, pretrained)
        if init == "imagenet":
            pretrained = True
        self.G_s = _resnet18_acm(1000, pretrained, features_only=True)
        # built in every case, so the heads below draw the same random numbers whatever ``init`` is
        self.G_t = _resnet18_acm(1000, False if init == "shared" else pretrained, features_only=True)
        if init == "shared":
            self.G_t.load_state_dict(self.G_s.state_dict())
            self.G_t.pretrained_used, self.G_t.imagenet_weights = self.G_s.pretrained_used, self.G_s.imagenet_weights
        self.init = init
        d = self.G_s.num_features
        self.head_s = nn.Linear(d, num_classes)
        self.head_t = nn.Linear(d, num_classes)
        self.head_f = nn.Linear(d, num_classes)
        a = torch.tensor(float(alpha))
        if learn_alpha:
            self.alpha = nn.Parameter(a)
        else:
            self.register_buffer("alpha", a)
        self.learn_alpha = bool(learn_alpha)
        self.pretrained_used = bool(self.G_s.pretrained_used and self.G_t.pretrained_used)
        self.imagenet_weights = self.G_s.imagenet_weights if self.pretrained_used else None

    def forward(self, x_s: torch.Tensor, x_t: torch.Tensor) -> TwinOutput:
        g_s, acm_s = self.G_s.features(x_s)
        g_t, acm_t = self.G_t.features(x_t)
        return self.output(g_s, g_t, acm_s + acm_t)

    def output(self, g_s: torch.Tensor, g_t: torch.Tensor, acm: torch.Tensor | None = None) -> TwinOutput:
        """The heads on the backbones' features: ``head_s(g_s)``, ``head_t(g_t)``, ``head_f`` on Eq. (2)."""
        g = fuse(self.alpha, g_s, g_t)  # before the heads: the graph's order fixes backward's order of sums
        return TwinOutput(self.head_s(g_s), self.head_t(g_t), self.head_f(g), g_s, g_t, acm)

    @property
    def acm_term(self):
        """Deprecated: the ACM term is returned by the forward (``out.acm``), no longer kept on the model."""
        raise RuntimeError("TwinNet.acm_term is deprecated: read the ACM term of a forward as out.acm "
                             "(or out.aux['acm'])")


def default_image_size(name: str) -> int:
    """The paper-era input size of a model: 299 for Inception-v3 and Xception, else 224 (design section 3)."""
    return model_spec(name).image_size


def scaled_image_size(name: str, base: int) -> int:
    """The input size of ``name`` in a setting whose 224-px networks read ``base`` px: scaled by the
    network's paper-era size (299 / 224 for Inception-v3 and Xception)."""
    native = default_image_size(name)
    return base if native == 224 else int(round(base * native / 224))


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"osteo/models.py: unknown model {name!r}; known: {', '.join(MODEL_NAMES)} "
                         "(the twin network is TwinNet)")


def build_model(name: str, num_classes: int = 3, pretrained=False, image_size: int | None = None) -> nn.Module:
    """A single-input network of Table 5 with a ``num_classes`` head; sets ``model.pretrained_used``.

    ``xception`` is timm's ``legacy_xception`` (classic Xception); the rest are torchvision's.
    Inception-v3 is built without the auxiliary classifier. ``image_size`` matters only for
    ``vit_b_16`` (a multiple of 16; default 224; pretrained position embeddings are interpolated)
    and is checked against Inception-v3's minimum of 75 px; the convolutional nets accept any size.
    Note: the timm Xception weights were trained on inputs scaled to [-1, 1], our inputs use the
    ImageNet mean/std (design section 3) for every model; fine-tuning absorbs the difference.
    """
    _check_name(name)
    _check_pretrained(pretrained)
    if image_size is not None and image_size < _MIN_SIZE.get(name, 1):
        raise ValueError(f"osteo/models.py: {name} needs inputs of at least {_MIN_SIZE.get(name, 1)} px, got image_size={image_size}")
    if name == "resnet18_acm":
        return resnet18_acm(num_classes, pretrained)
    if name == "resnet18":
        model = tvm.resnet18(weights=None, num_classes=num_classes)
    elif name == "inception_v3":
        model = tvm.inception_v3(weights=None, num_classes=num_classes, aux_logits=False, init_weights=True)
    elif name == "efficientnet_b0":
        model = tvm.efficientnet_b0(weights=None, num_classes=num_classes)
    elif name == "vit_b_16":
        size = 224 if image_size is None else int(image_size)
        if size % 16:
            raise ValueError(f"osteo/models.py: vit_b_16 needs image_size divisible by its patch size 16, got {size}")
        model = tvm.vit_b_16(weights=None, num_classes=num_classes, image_size=size)
    else:  # xception
        import timm  # only here: timm is imported (slowly) when an Xception is built, not with osteo

        model = timm.create_model(XCEPTION_TIMM_NAME, pretrained=False, num_classes=num_classes)
    load_imagenet_weights(model, name, pretrained)
    return model


def gradcam_layer(model: nn.Module, branch: str = "s") -> nn.Module:
    """The Grad-CAM target layer of a model (design section 4, Fig. 4).

    ResNets: the last block of ``layer4`` (with ACM: its output maps, ``layer4[-1].maps``); TwinNet:
    that of ``G_s`` or ``G_t`` (``branch`` "s" / "t"); Inception-v3: ``Mixed_7c``; EfficientNet-b0: the last feature block;
    Xception: ``act4`` (the final ReLU); ViT-B/16: ``ln_1`` of the last encoder layer (token maps,
    which :func:`osteo.gradcam.grad_cam` reshapes to the patch grid).
    """
    if isinstance(model, TwinNet):
        if branch not in ("s", "t"):
            raise ValueError(f"osteo/models.py: branch must be 's' or 't', got {branch!r}")
        return (model.G_s if branch == "s" else model.G_t).layer4[-1].maps
    if isinstance(model, ResNetACM):
        return model.layer4[-1].maps  # the last block's output (the block returns it with its ACM term)
    if isinstance(model, ResNet):
        return model.layer4[-1]
    if isinstance(model, tvm.Inception3):
        return model.Mixed_7c
    if isinstance(model, tvm.EfficientNet):
        return model.features[-1]
    if isinstance(model, tvm.VisionTransformer):
        return model.encoder.layers[-1].ln_1
    if hasattr(model, "act4") and type(model).__name__ == "Xception":
        return model.act4
    raise ValueError(f"osteo/models.py: no Grad-CAM layer known for {type(model).__name__}")


# ---- the model registry: the one place that knows model names ------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """How the kit builds and runs one kind of network (an entry of :data:`MODELS`).

    ``build(cfg)`` makes the network from a config (:class:`osteo.training.TrainConfig` fields);
    ``forward(model, xs)`` runs it on its ``n_inputs`` views and returns a :class:`ModelOutput`
    (or an object with the same fields); ``grouped`` is an optional faster forward computing the
    same (the batched engine, :mod:`osteo.grouped`). ``main_head`` names the prediction head;
    ``gradcam(model)`` lists ``(input index, layer, head)`` per map; ``scalars(model)`` gives learned
    scalars to record (``{"alpha": ...}``). ``options`` are the config fields the network reads beyond
    the common ones (``lam``, ``alpha``, ``learn_alpha``, ``init``); ``image_size`` its paper-era input size.
    """

    name: str
    build: Callable
    forward: Callable
    n_inputs: int = 1
    main_head: str = "main"
    grouped: Callable | None = None
    gradcam: Callable | None = None
    scalars: Callable = field(default=lambda model: {})
    options: tuple = ()
    image_size: int = 224
    default_inputs: tuple = ("t",)

    def run(self, model: nn.Module, xs, grouped: bool = False):
        """The network's output on its views ``xs``; ``grouped`` uses the batched engine when it has one."""
        if len(xs) != self.n_inputs:
            raise ValueError(f"osteo/models.py: {self.name} reads {self.n_inputs} input(s), got {len(xs)}")
        fn = self.grouped if grouped and self.grouped is not None else self.forward
        return fn(model, *xs)


#: Every network the kit trains, by name. Add one with :func:`register_model`.
MODELS: dict = {}
#: The network a config trains unless it names another: the paper's twin.
DEFAULT_MODEL = "twin"


def register_model(spec: ModelSpec, replace: bool = False) -> ModelSpec:
    """Add a network to :data:`MODELS` (``TrainConfig(model=spec.name)`` then trains it)."""
    if spec.name in MODELS and not replace:
        raise ValueError(f"osteo/models.py: a model named {spec.name!r} is already registered")
    MODELS[spec.name] = spec
    return spec


def model_spec(name: str) -> ModelSpec:
    """The registry entry of ``name``; a ValueError naming the known models otherwise."""
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"osteo/models.py: unknown model {name!r}; known: {', '.join(MODELS)}") from None


def run_model(name: str, model: nn.Module, xs, grouped: bool = False):
    """``model_spec(name).run(model, xs, grouped)``: the :class:`ModelOutput` of a network on its views."""
    return model_spec(name).run(model, xs, grouped)


def _single_forward(model: nn.Module, x: torch.Tensor) -> ModelOutput:
    if isinstance(model, ResNetACM):
        g, acm = model.features(x)
        return ModelOutput({"main": model.fc(g)}, {"g": g}, {"acm": acm})
    return ModelOutput({"main": model(x)}, {}, {})


def _single_spec(name: str) -> ModelSpec:
    return ModelSpec(
        name=name, n_inputs=1, image_size=299 if name in ("inception_v3", "xception") else 224,
        build=lambda cfg: build_model(name, num_classes=cfg.num_classes, pretrained=cfg.pretrained,
                                      image_size=cfg.image_size),
        forward=_single_forward, gradcam=lambda model: [(0, gradcam_layer(model), "main")],
    )


def _grouped_twin(model, x_s, x_t):
    return grouped_twin_forward(model, x_s, x_t)[0]


TWIN = ModelSpec(
    name=DEFAULT_MODEL, n_inputs=2, main_head="f", default_inputs=("s", "t"),
    build=lambda cfg: TwinNet(cfg.num_classes, alpha=cfg.alpha, learn_alpha=cfg.learn_alpha,
                              pretrained=cfg.pretrained, init=cfg.init),
    forward=lambda model, x_s, x_t: model(x_s, x_t), grouped=_grouped_twin,
    gradcam=lambda model: [(0, gradcam_layer(model, "s"), "s"), (1, gradcam_layer(model, "t"), "t")],
    scalars=lambda model: {"alpha": float(model.alpha.detach())},
    options=("lam", "alpha", "learn_alpha", "init"),
)
register_model(TWIN)
for _name in MODEL_NAMES:
    register_model(_single_spec(_name))
