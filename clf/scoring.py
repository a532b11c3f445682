"""The actor of jobs.evaluate: pixel batches in, class probabilities out.

Apart from the report code, so that its process imports neither matplotlib nor scikit-learn
(1.6 s before the first batch, on the critical path of every evaluation).
"""

from __future__ import annotations

import numpy as np

from clf import artifact, runtime


class Scorer:
    """Actor: loads the artifact once, then turns pixel batches into class probabilities."""

    def __init__(self, model_uri: str, prefer_gpu: bool):
        import torch

        self.torch = torch
        self.device = runtime.torch_device(prefer_gpu)
        self.artifact = artifact.load(model_uri, self.device)
        self.num_classes = len(self.artifact.classes)
        self.cuda = self.device.type == "cuda"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        probs = np.zeros((len(ok), self.num_classes), dtype=np.float32)
        if ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            if self.cuda:
                pixels = pixels.pin_memory().to(self.device, non_blocking=True)
            with (
                torch.inference_mode(),
                torch.autocast("cuda", enabled=self.cuda, dtype=torch.bfloat16),
            ):
                logits = self.artifact.logits(self.artifact.preprocess.normalize(pixels))
            probs[ok] = torch.softmax(logits.float(), dim=1).cpu().numpy()
        return {
            "key": batch["key"],
            "path": batch["path"],
            "label": batch["label"],
            "probs": probs,
            "error": batch["error"],
        }
