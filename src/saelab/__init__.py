"""saelab: sparse dictionary learning on neural-network activations.

    from saelab import SAE, train_sae
    sae = train_sae(activations, architecture="topk", n_latents=4096, k=32)
    z = sae.encode(x); x_hat = sae.decode(z); sae.save("my_sae")
    sae = SAE.load("my_sae")

    from saelab import load_model, harvest, HarvestConfig, ActivationStore, splice_eval
    lm = load_model("smollm2-135m")
    harvest(HarvestConfig(model="smollm2-135m", hooks=["blocks.6.hook_resid_post"]), "store", lm=lm)
    sae = train_sae(ActivationStore("store"), architecture="topk", expansion_factor=16, k=32)

    from saelab import build_atlas, AtlasConfig, Atlas
    build_atlas("my_sae", AtlasConfig(tokens=200_000), "my_sae.atlas", lm=lm)
    Atlas("my_sae.atlas").page(0)   # one feature: examples, histogram, logit effects, ...
"""

__version__ = "0.5.0"

from saelab.errors import InputError, SaelabError, TrainingDiverged
from saelab.sae import SAE, create
from saelab.sae.config import SAEConfig
from saelab.train import train_sae
from saelab.train.config import TrainConfig

# Heavier pieces (transformers) load on first use, so `import saelab` stays quick.
_LAZY = {
    "load_model": "saelab.models",
    "harvest": "saelab.activations.harvest",
    "ModelStream": "saelab.activations.harvest",
    "ActivationStore": "saelab.activations.store",
    "splice_eval": "saelab.eval.splice",
    "HarvestConfig": "saelab.config",
    "TextConfig": "saelab.config",
    "AtlasConfig": "saelab.config",
    "build_atlas": "saelab.analyse.atlas",
    "Atlas": "saelab.analyse.atlasdb",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'saelab' has no attribute {name!r}")


__all__ = [
    "SAE",
    "ActivationStore",
    "Atlas",
    "AtlasConfig",
    "HarvestConfig",
    "InputError",
    "ModelStream",
    "SAEConfig",
    "SaelabError",
    "TextConfig",
    "TrainConfig",
    "TrainingDiverged",
    "__version__",
    "build_atlas",
    "create",
    "harvest",
    "load_model",
    "splice_eval",
    "train_sae",
]
