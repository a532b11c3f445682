"""jobs.train: fine-tune or train a classifier with Ray Train (DDP), resumable.

- ``checks``: flags, data and resume, before Ray starts;
- ``trainer``: the driver: ``train()`` builds the TorchTrainer, fits, and exports the best epoch;
- ``embedded_trainer``: that TorchTrainer on an embedded Ray, less what only a cluster needs;
- ``loop``: each worker: ``train_loop_per_worker`` -> ``train_one_epoch`` -> ``train_step``;
- ``loader``: the shard splits each worker reads, decoded and augmented per batch;
- ``optim``: optimizer, schedule and parameter groups;
- ``checkpoint``: what a checkpoint holds and how it is found again;
- ``history``: ``metrics.jsonl``, ``curves.png`` and TensorBoard events;
- ``preview``: a grid of augmented training images.
"""

# What the driver of a run imports; jobs.train imports them in a thread while Ray starts.
DRIVER_MODULES = ("clf.training.trainer", "clf.training.loop", "clf.training.embedded_trainer")
