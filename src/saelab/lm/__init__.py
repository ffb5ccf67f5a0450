"""Language models trained here: a tokenizer and a small GPT-2-style transformer."""

from saelab.lm.train import LMResult, train_lm

__all__ = ["LMResult", "train_lm"]
