"""Session-wide fixtures: the real models, loaded once."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm():
    from saelab.models import load_model

    return load_model("minilm-l6")


@pytest.fixture(scope="session")
def smollm():
    from saelab.models import load_model

    return load_model("smollm2-135m")


XSS_SCRIPT = "<script>window.__xss = 1</script>"
XSS_IMG = '"><img src=x onerror="window.__xss = 2">'


@pytest.fixture(scope="session")
def small_atlas(tmp_path_factory, smollm):
    """An atlas of a random TopK SAE (1,152 latents, k = 16) on SmolLM2 blocks.2, over a small
    corpus whose held-out half contains HTML/JS injection attempts."""
    import torch
    from helpers import write_corpus

    from saelab.analyse.atlas import build_atlas
    from saelab.config import AtlasConfig
    from saelab.sae.base import create
    from saelab.sae.config import SAEConfig

    root = tmp_path_factory.mktemp("atlas")
    corpus = write_corpus(root / "corpus", n_docs=24, words=70)
    for i in range(6):
        (corpus / f"web_{i}.txt").write_text(
            f"Page {i} says {XSS_SCRIPT} and then {XSS_IMG} before the end of the page.\n")
    sae = create(SAEConfig(architecture="topk", d_in=576, n_latents=1152, k=16,
                           hook_name="blocks.2.hook_resid_post", model_name="smollm2-135m"))
    sae.init_weights(torch.Generator().manual_seed(0))
    sae.save(root / "sae")
    cfg = AtlasConfig(corpus=str(corpus), context_length=64, batch_size=4, heldout_fraction=0.5,
                      eval_tokens=256, progress=False)
    result = build_atlas(root / "sae", cfg, root / "small.atlas", lm=smollm)
    return {"path": result.path, "sae": root / "sae", "cfg": cfg, "result": result, "root": root}


@pytest.fixture(scope="session")
def trained_sae(tmp_path_factory, smollm):
    """A TopK SAE (4x, k = 16) trained for real on SmolLM2 blocks.3.hook_resid_post, streamed
    from the model over 120k tokens of the Python sources (about half a minute)."""
    from saelab.activations.harvest import ModelStream
    from saelab.config import TextConfig
    from saelab.train.config import TrainConfig
    from saelab.train.trainer import Trainer

    out = tmp_path_factory.mktemp("trained") / "sae"
    text = TextConfig(corpus="python-stdlib", context_length=128, batch_size=16)
    source = ModelStream(smollm, "blocks.3.hook_resid_post", text, tokens=120_000)
    cfg = TrainConfig(architecture="topk", expansion_factor=4, k=16, tokens=120_000, batch_size=1024, lr=1e-3,
                      progress=False, model_name="smollm2-135m", hook_name="blocks.3.hook_resid_post")
    sae = Trainer(source, cfg, out).run()
    return sae, out
