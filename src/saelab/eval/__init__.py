"""Measuring SAEs: reconstruction and sparsity metrics (later: splicing, scaling fits)."""
