"""The dictionary models: a shared base and one module per architecture, each holding the
architecture's config and its SAE. Importing a module registers both, so the import of the
architecture modules below is the registry: a new architecture is its module and its name there."""

from saelab.sae import batchtopk, gated, jumprelu, matryoshka, relu, topk, transcoder  # noqa: F401  (registry)
from saelab.sae.arch import ArchConfig
from saelab.sae.base import SAE, Codes, ForwardOutput, TrainContext, create
from saelab.sae.config import SAEConfig

ARCHITECTURES: tuple[str, ...] = tuple(ArchConfig.registry)

__all__ = ["ARCHITECTURES", "SAE", "ArchConfig", "Codes", "ForwardOutput", "SAEConfig", "TrainContext",
           "create"]
