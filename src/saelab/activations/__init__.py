"""Activations: reading them for training (sources), later harvesting and storing them."""

from saelab.activations.source import ActivationSource, MatrixSource, load_matrix, open_source

__all__ = ["ActivationSource", "MatrixSource", "load_matrix", "open_source"]
