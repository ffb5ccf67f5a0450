"""saelab: sparse dictionary learning on neural-network activations.

    from saelab import SAE, train_sae
    sae = train_sae(activations, architecture="topk", n_latents=4096, k=32)
    z = sae.encode(x); x_hat = sae.decode(z); sae.save("my_sae")
    sae = SAE.load("my_sae")
"""

__version__ = "0.1.0"

from saelab.config import SAEConfig, TrainConfig
from saelab.errors import InputError, SaelabError, TrainingDiverged
from saelab.sae import SAE, create
from saelab.train import train_sae

__all__ = [
    "SAE",
    "InputError",
    "SAEConfig",
    "SaelabError",
    "TrainConfig",
    "TrainingDiverged",
    "__version__",
    "create",
    "train_sae",
]
