"""The dictionary models. One file per architecture over :mod:`saelab.sae.base`."""

from saelab.sae.base import SAE, ForwardOutput, TrainContext, create
from saelab.sae.batchtopk import BatchTopKSAE
from saelab.sae.gated import GatedSAE
from saelab.sae.jumprelu import JumpReluSAE
from saelab.sae.relu import ReluSAE
from saelab.sae.topk import TopKSAE

__all__ = [
    "SAE",
    "BatchTopKSAE",
    "ForwardOutput",
    "GatedSAE",
    "JumpReluSAE",
    "ReluSAE",
    "TopKSAE",
    "TrainContext",
    "create",
]
