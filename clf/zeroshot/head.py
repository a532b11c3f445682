"""The zero-shot classifier: CLIP's image tower, the normalised embedding, and one linear layer
whose rows are the class names' text embeddings times CLIP's logit scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clf import storage
from clf.errors import UsageError

# A short set, as open_clip's SIMPLE_IMAGENET_TEMPLATES; `--prompts imagenet` gives its 80.
DEFAULT_PROMPTS = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a low resolution photo of a {}.",
    "a cropped photo of a {}.",
)


class ZeroShotClassifier(nn.Module):
    """Image tower -> normalised embedding -> ``head`` (no bias): logits as CLIP scores them."""

    def __init__(self, visual: nn.Module, text_embeddings: torch.Tensor, logit_scale: float):
        super().__init__()
        self.visual = visual
        classes, dim = text_embeddings.shape
        self.head = nn.Linear(dim, classes, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(text_embeddings * logit_scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(self.visual(images), dim=-1))


def resolve_prompts(spec: str | None) -> list[str]:
    """None: ``DEFAULT_PROMPTS``; ``imagenet``: open_clip's 80 ImageNet templates; else a text
    file, one template with ``{}`` per line."""
    if spec is None:
        return list(DEFAULT_PROMPTS)
    if spec == "imagenet":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]
    if not storage.exists(spec):
        raise UsageError(f"--prompts {spec}: not found (give a file or 'imagenet')")
    prompts = [line.strip() for line in storage.read_bytes(spec).decode().splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts or any("{}" not in p for p in prompts):
        raise UsageError(f"--prompts {spec}: expected one template with {{}} per line")
    return prompts


def zero_shot_classifier(
    model: nn.Module, tokenizer, classes: list[str], prompts: list[str]
) -> ZeroShotClassifier:
    """The classifier of ``classes``: each one's text embedding averaged over ``prompts`` and
    normalised, by open_clip's own ``build_zero_shot_classifier``."""
    import open_clip

    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(
            model, tokenizer, classes, prompts, device="cpu"
        )  # (dim, classes)
    scale = float(model.logit_scale.detach().exp())
    return ZeroShotClassifier(model.visual, weights.T.contiguous(), scale)


def build_zero_shot(
    name: str, pretrained: str, classes: list[str], prompts: list[str] = DEFAULT_PROMPTS
) -> ZeroShotClassifier:
    """The zero-shot classifier of ``classes`` from ``clip:ARCH``, its weights and the
    ``prompts`` templates (``resolve_prompts``)."""
    from clf.zeroshot.clip import load_clip

    model, tokenizer = load_clip(name, pretrained)
    return zero_shot_classifier(model, tokenizer, classes, list(prompts))
