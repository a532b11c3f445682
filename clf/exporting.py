"""Artifacts from a training run, or straight from pretrained weights with no training."""

from __future__ import annotations

from typing import Any

from clf import artifact, models, storage
from clf.errors import UsageError


def resolve_classes(spec: str) -> list[str]:
    """``imagenet`` (names shipped in torchvision), a classes.json, or a text file, one per line."""
    if spec == "imagenet":
        return models.imagenet_classes()
    if not storage.exists(spec):
        raise UsageError(f"--classes {spec}: not found (give a file or 'imagenet')")
    text = storage.read_bytes(spec).decode()
    if spec.endswith(".json"):
        import json

        classes = json.loads(text)
    else:
        classes = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(classes, list) or not classes:
        raise UsageError(f"--classes {spec}: expected a non-empty list of class names")
    return [str(c) for c in classes]


def from_pretrained(
    name: str, pretrained: str, classes_spec: str, output: str, formats=("torchscript",)
) -> dict[str, Any]:
    models.check_model_name(name)
    classes = resolve_classes(classes_spec)
    model = models.create_model(name, len(classes), pretrained=pretrained)
    if models.head(model).out_features != len(classes):
        raise UsageError(f"--classes has {len(classes)} names but the weights' head differs")
    return artifact.export(
        model,
        output,
        arch=name,
        classes=classes,
        preprocess=models.default_preprocess(name, model),
        formats=tuple(formats),
        source_run=None,
        metrics={
            "pretrained": storage.normalize(pretrained) if "://" not in pretrained else pretrained
        },
    )
