"""Training SAEs: one loop for every architecture (:mod:`saelab.train.trainer`)."""

from saelab.train.trainer import Trainer, train_sae

__all__ = ["Trainer", "train_sae"]
