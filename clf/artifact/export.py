"""Writing an artifact: from a model in memory (a training run's best epoch), or straight from
pretrained weights with no training. Every format is checked against the eager model on real
images (``sample``) before anything is written."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import torch
from torch import nn

from clf import models, storage
from clf.artifact import formats as fmts
from clf.artifact.meta import FILES, check_formats
from clf.artifact.reference import record_reference
from clf.artifact.sample import load_sample
from clf.errors import UsageError
from clf.images.preprocess import Preprocess
from clf.zeroshot import clip, head

RANDOM_SAMPLE = "random tensors (no real images given)"


def export_artifact(
    model: nn.Module,
    output: str,
    *,
    arch: str,
    classes: list[str],
    preprocess: Preprocess,
    formats: tuple[str, ...] = ("torchscript",),
    source_run: str | None = None,
    metrics: dict[str, Any] | None = None,
    sample: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    sample_source: str | None = None,
    min_int8_agreement: float | None = None,
    sample_uris: list[str] | None = None,
    reference: str | None = None,
) -> dict[str, Any]:
    """Write the artifact in every format of ``formats``; the first is the default one.

    ``sample`` (normalized float NCHW, real images) is what each format is checked on, and what
    int8 is calibrated on; ``labels``, if given, add the accuracy drop of int8 to meta.json.
    Any check that fails raises ``ModelLoadError`` before anything is written.
    ``reference``: images whose label rows become the artifact's reference; those of the sample
    (named by ``sample_uris``, in its order) keep the default format's logits from its check.
    """
    check_formats(formats)
    if "int8" in formats and (sample is None or len(sample) < fmts.INT8_MIN_IMAGES):
        raise UsageError(
            f"int8 needs at least {fmts.INT8_MIN_IMAGES} real images to calibrate and check on, "
            f"got {0 if sample is None else len(sample)} (give more with --sample)"
        )
    if sample is None:
        sample = torch.randn(4, 3, preprocess.input_size, preprocess.input_size)
        sample_source = RANDOM_SAMPLE
    model = model.eval().cpu().to(memory_format=torch.contiguous_format)
    if min_int8_agreement is None:
        min_int8_agreement = fmts.INT8_MIN_AGREEMENT
    exported = fmts.export_all(model, formats, sample.float(), labels, min_int8_agreement)

    meta_uri = storage.join(output, "meta.json")
    storage.delete(meta_uri)  # an old meta.json must never describe the new files
    for fmt, done in exported.items():
        storage.write_bytes(storage.join(output, FILES[fmt]), done.blob)
    sha = {fmt: hashlib.sha256(done.blob).hexdigest() for fmt, done in exported.items()}
    meta = {
        "format": formats[0],
        "files": {fmt: FILES[fmt] for fmt in formats},
        "file_sha256": sha,
        "arch": arch,
        "num_classes": len(classes),
        "classes": list(classes),
        **preprocess.to_meta(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_run": source_run,
        "metrics": metrics or {},
        "parity": {
            "sample": sample_source or "given by the caller",
            **{fmt: done.report for fmt, done in exported.items()},
        },
        "sha256": sha[formats[0]],
    }
    storage.write_json(meta_uri, meta)  # last: marks a complete artifact
    if reference is not None:
        probs = torch.softmax(exported[formats[0]].logits.float(), dim=1).numpy()
        meta = record_reference(output, reference, known=dict(zip(sample_uris or [], probs)))
    return meta


def resolve_classes(spec: str) -> list[str]:
    """``imagenet`` (names shipped in torchvision), a classes.json, or a text file, one per line."""
    if spec == "imagenet":
        return models.imagenet_classes()
    if not storage.exists(spec):
        raise UsageError(f"--classes {spec}: not found (give a file or 'imagenet')")
    text = storage.read_bytes(spec).decode()
    if spec.endswith(".json"):
        classes = json.loads(text)
    else:
        classes = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(classes, list) or not classes:
        raise UsageError(f"--classes {spec}: expected a non-empty list of class names")
    return [str(c) for c in classes]


def from_pretrained(
    name: str,
    pretrained: str,
    classes_spec: str,
    output: str,
    formats: tuple[str, ...] = ("torchscript",),
    sample: str | None = None,
    min_int8_agreement: float | None = None,
    prompts: str | None = None,
) -> dict[str, Any]:
    """An artifact of ``name``'s pretrained weights; ``clip:ARCH`` makes a zero-shot
    classifier of ``classes_spec`` from the ``prompts`` templates."""
    classes = resolve_classes(classes_spec)
    zero_shot = {}
    if clip.is_clip(name):
        templates = head.resolve_prompts(prompts)
        model = head.build_zero_shot(name, pretrained, classes, templates)
        spec = clip.clip_preprocess(model.visual)
        zero_shot = {"zero_shot": {"prompts": templates}}
    else:
        if prompts is not None:
            raise UsageError("--prompts is for zero-shot models, --model clip:ARCH")
        models.check_model_name(name)
        model = models.create_model(name, len(classes), pretrained=pretrained, with_head=True)
        spec = models.default_preprocess(name, model)
    images = load_sample(sample, spec, classes)
    meta = export_artifact(
        model,
        output,
        arch=name,
        classes=classes,
        preprocess=spec,
        formats=tuple(formats),
        source_run=None,
        metrics={
            "pretrained": storage.normalize(pretrained) if "://" not in pretrained else pretrained,
            **zero_shot,
        },
        sample=images.images,
        labels=images.labels,
        sample_source=images.source,
        min_int8_agreement=min_int8_agreement,
        sample_uris=images.uris,
        reference=images.location,  # None for the packaged photos, which are nobody's data
    )
    return meta
