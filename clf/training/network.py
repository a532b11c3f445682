"""The network a run trains: a model from ``models`` by name, or, for ``clip:ARCH``, CLIP's
image tower whose head starts as the zero-shot classifier of the run's class names."""

from __future__ import annotations

from torch import nn

from clf import models
from clf.images.preprocess import Preprocess
from clf.zeroshot import clip, head


def create_network(
    name: str, classes: list[str], pretrained: str | None, drop_rate: float = 0.0
) -> nn.Module:
    if clip.is_clip(name):  # the checks make sure clip models come with their weights
        return head.build_zero_shot(name, pretrained, classes)
    return models.create_model(name, len(classes), pretrained=pretrained, drop_rate=drop_rate)


def network_preprocess(name: str, pretrained: str | None) -> Preprocess:
    if clip.is_clip(name):
        return clip.clip_preprocess_of(name, pretrained)
    return models.default_preprocess(name)
