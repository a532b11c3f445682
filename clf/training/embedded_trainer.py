"""Ray Train's TorchTrainer for an embedded Ray, less what only a lasting cluster needs."""

from __future__ import annotations

from ray.train.torch import TorchTrainer

# Private: Ray Train has no switch for its placement-group cleaner.
from ray.train.v2._internal.callbacks.placement_group_callback import (
    PlacementGroupCleanerCallback,
)


class EmbeddedTorchTrainer(TorchTrainer):
    """Without the placement-group cleaner. That detached actor frees the run's placement group
    should the controller die, and asks the dashboard's State API every second whether it lives;
    the controller waits for it to start before training. An embedded Ray ends with the job and
    takes the group with it, so the actor and the dashboard it needs were start-up cost alone
    (benchmarks/RESULTS.md)."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]
