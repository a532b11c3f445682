"""Build any classifier by name, the way ``timm.create_model`` does.

Names resolve in this order: ``small_cnn`` (ours, from scratch), a torchvision model
(``resnet50``, ``mobilenet_v2``...), then a timm model (``convnext_tiny``, ``tf_efficientnet_lite0``...).
Prefix ``timm/`` or ``torchvision/`` to choose explicitly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torchvision
from torch import nn

from clf import storage
from clf.errors import ModelLoadError, UsageError
from clf.images.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU-pool blocks and a linear head: the from-scratch baseline."""

    def __init__(self, num_classes: int, width: int = 32, drop_rate: float = 0.0):
        super().__init__()
        blocks, channels = [], 3
        for out in (width, width * 2, width * 4, width * 8):
            blocks += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = out
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(drop_rate), nn.Linear(channels, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def _family(name: str) -> tuple[str, str]:
    if "/" in name:
        family, arch = name.split("/", 1)
        if family not in ("timm", "torchvision"):
            raise UsageError(
                f"unknown model family {family!r} in {name!r} (use timm/ or torchvision/)"
            )
        return family, arch
    if name == "small_cnn":
        return "clf", name
    if name in torchvision.models.list_models(module=torchvision.models):
        return "torchvision", name
    import timm

    if timm.is_model(name):
        return "timm", name
    raise UsageError(f"unknown model {name!r}: not small_cnn, a torchvision model or a timm model")


def check_model_name(name: str) -> str:
    """Validate a name without building anything (for flag checking before Ray starts)."""
    _family(name)
    return name


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: str | None = None,
    drop_rate: float = 0.0,
    with_head: bool = False,
) -> nn.Module:
    """A model with a ``num_classes`` head; the backbone loads ``pretrained`` if given.

    The head is fresh unless ``with_head``: then it comes from the weights too, and weights
    whose head has another number of classes are refused.
    """
    family, arch = _family(name)
    if family == "clf":
        model = SmallCNN(num_classes, drop_rate=drop_rate)
    elif family == "torchvision":
        model = torchvision.models.get_model(arch, weights=None)
        if drop_rate:
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = drop_rate
    else:
        import timm

        model = timm.create_model(arch, pretrained=False, drop_rate=drop_rate)
    if with_head:
        reset_head(model, num_classes)
    if pretrained:
        load_pretrained(model, pretrained, name, with_head=with_head)
    reset_head(model, num_classes)
    return model


def head(model: nn.Module) -> nn.Linear:
    """The last linear layer: the classifier of every torchvision, timm and clf model."""
    if hasattr(model, "get_classifier"):  # timm
        classifier = model.get_classifier()
        if isinstance(classifier, nn.Linear):
            return classifier
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError(f"{type(model).__name__} has no linear classifier to replace")
    return linears[-1]


def reset_head(model: nn.Module, num_classes: int) -> None:
    old = head(model)
    if old.out_features == num_classes:
        return
    if hasattr(model, "reset_classifier"):  # timm knows where its head lives
        model.reset_classifier(num_classes)
        return
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if child is old:
                setattr(parent, child_name, new)
                return


def head_parameter_names(model: nn.Module) -> set[str]:
    classifier = head(model)
    ids = {id(p) for p in classifier.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def load_state_dict_file(uri: str) -> Mapping[str, torch.Tensor]:
    """A state dict from a path or URI, never running pickled code (``weights_only=True``)."""
    if not storage.exists(uri):
        raise ModelLoadError(f"pretrained weights not found: {uri}")
    path = storage.local_copy(uri)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(
            f"cannot load weights from {uri}: {str(e).splitlines()[0][:160]}"
        ) from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ModelLoadError(f"{uri} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_pretrained(model: nn.Module, uri: str, name: str, *, with_head: bool = False) -> None:
    """Load backbone weights; a head of another size is skipped (unless ``with_head``), anything
    else must match."""
    state = load_state_dict_file(uri)
    own = model.state_dict()
    heads = head_parameter_names(model)
    if with_head:
        weight = next(k for k in heads if own[k].dim() == 2)
        if weight not in state or state[weight].shape != own[weight].shape:
            found = f"a {state[weight].shape[0]}-class head" if weight in state else "no head"
            raise ModelLoadError(
                f"weights {uri} hold {found}, not the {own[weight].shape[0]} classes asked for"
            )
        heads = set()
    missing = [k for k in own if k not in state and k not in heads]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape and k not in heads]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{len(keys)} {what} (e.g. {keys[0]})"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("mis-shaped", wrong),
            )
            if keys
        )
        raise ModelLoadError(f"weights {uri} do not fit {name}: {detail}")
    usable = {k: v for k, v in state.items() if v.shape == own[k].shape}
    model.load_state_dict(usable, strict=False)


def default_preprocess(name: str, model: nn.Module | None = None) -> Preprocess:
    """The preprocessing the architecture was trained with (timm's pretrained_cfg if it has one)."""
    family, arch = _family(name)
    if family == "timm":
        import timm

        cfg = timm.data.resolve_data_config(
            {}, model=model or timm.create_model(arch, pretrained=False)
        )
        size = int(cfg["input_size"][-1])
        return Preprocess(
            input_size=size,
            resize=int(round(size / cfg.get("crop_pct", 0.875))),
            interpolation=cfg.get("interpolation", "bilinear"),
            mean=tuple(float(x) for x in cfg["mean"]),
            std=tuple(float(x) for x in cfg["std"]),
        )
    if family == "clf":
        return Preprocess(input_size=64, resize=64, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return Preprocess()  # torchvision's ImageNet recipe: resize 256, crop 224, bilinear


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in index order, shipped inside torchvision."""
    return list(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])
