"""Training on Ray Train: ``train(cfg)`` on the driver, ``train_loop_per_worker`` on workers."""

from clf.training.trainer import TrainSummary, export_run, train

__all__ = ["TrainSummary", "export_run", "train"]
