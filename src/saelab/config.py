"""Typed, validated configuration for the pipeline's stages, grouped by stage: the text and
its windows, harvesting, the feature atlas, the demo, the language model, evaluation, the
viewer, steering and feature splitting. Validation happens
once, here, at the boundary; the field descriptions double as the CLI's ``--help``
(:mod:`saelab.flags`).

What defines an SAE and its architecture lives with the SAE (:mod:`saelab.sae.config`,
one config per architecture module), how to train one with the trainer
(:mod:`saelab.train.config`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from saelab.config_base import FORMAT_VERSION, Config, DType, build, validation_message

_Config = Config  # the name the stage configs below (and older code) use

__all__ = ["FORMAT_VERSION", "AtlasConfig", "DType", "DemoConfig", "EvalConfig", "HarvestConfig",
           "LMConfig", "ServeConfig", "SplitConfig", "SteerConfig", "TextConfig", "build",
           "validation_message"]


class TextConfig(_Config):
    """Which text and how it is cut into windows (shared by harvest and evaluation)."""

    corpus: str = Field(
        default="python-docs+python-stdlib",
        description="Corpus: python-stdlib, python-docs, a text/JSONL/parquet file or folder, a "
        "datasets.save_to_disk folder; join several with '+'.",
    )
    context_length: int = Field(default=256, ge=4, description="Tokens per context window.")
    batch_size: int = Field(default=16, gt=0, description="Context windows per forward pass.")
    heldout_fraction: float = Field(
        default=0.05, ge=0, lt=1, description="Share of documents held out for evaluation."
    )
    text_field: str = Field(default="text", description="Text field of JSONL / parquet / datasets rows.")
    keep_special: bool = Field(
        default=False, description="Keep BOS/CLS/SEP positions (dropped by default)."
    )
    device: str = Field(default="auto", description="Device for the model: auto, cpu, cuda[:N].")


class HarvestConfig(TextConfig):
    """Model x corpus -> activation store."""

    model: str = Field(description="Model: smollm2-135m, minilm-l6, a local HF folder or .gguf file.")
    hooks: list[str] = Field(min_length=1, description="Hook points, e.g. blocks.6.hook_resid_post.")
    tokens: int = Field(default=1_000_000, gt=0, description="Activation rows to harvest per hook.")
    dtype: DType = Field(default="float16", description="Storage dtype of the shards.")
    shard_rows: int = Field(default=65536, gt=0, description="Rows per shard (approximately).")
    split: Literal["train", "heldout"] = Field(
        default="train", description="Which documents to read: train, or the held-out ones (for evaluation)."
    )
    progress: bool = Field(default=True, description="Show a progress bar.")


class AtlasConfig(TextConfig):
    """SAE x model x held-out text -> feature atlas (statistics and examples of every feature)."""

    model: str | None = Field(default=None, description="Model [default: the one in the SAE's cfg.json].")
    hook: str | None = Field(default=None, description="Hook point [default: the one in the SAE's cfg.json].")
    tokens: int = Field(default=1_000_000, gt=0, description="Held-out tokens to read.")
    top_examples: int = Field(
        default=16, ge=1, le=256, description="Top-activating examples kept per feature."
    )
    bands: int = Field(default=4, ge=1, le=16, description="Activation quantile bands per feature.")
    band_examples: int = Field(default=4, ge=1, le=64, description="Examples shown per quantile band.")
    before: int = Field(
        default=24, ge=0, le=512, description="Context tokens shown before the example's peak."
    )
    after: int = Field(default=8, ge=0, le=512, description="Context tokens shown after the example's peak.")
    neighbours: int = Field(default=10, ge=1, le=100, description="Nearest and co-firing features listed.")
    logit_tokens: int = Field(default=10, ge=1, le=100, description="Tokens listed per logit-effect side.")
    cofire_tokens: int = Field(default=32768, ge=0, description="Tokens sampled for co-firing statistics.")
    eval_tokens: int = Field(
        default=4096, ge=0, description="Held-out tokens for the splice metrics on the global page (0: skip)."
    )
    checkpoint_every: float = Field(default=60.0, gt=0, description="Seconds between resume checkpoints.")
    explainer_url: str | None = Field(
        default=None,
        description="OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1) for explanations.",
    )
    explainer_model: str = Field(default="gpt-4o-mini", description="Model name sent to the explainer.")
    explain_features: int = Field(
        default=100, ge=0, description="How many features (a random sample of those that fire) the explainer "
        "explains and scores."
    )
    seed: int = Field(default=0, description="Seed of the quantile-band sampling.")
    progress: bool = Field(default=True, description="Show a progress bar.")


class DemoConfig(_Config):
    """The whole pipeline on one model: harvest -> train TopK -> splice eval -> atlas -> viewer."""

    model: str = Field(default="smollm2-135m", description="Model: an alias, a local HF folder or .gguf.")
    hook: str = Field(default="blocks.6.hook_resid_post", description="Hook point to read.")
    corpus: str = Field(default="python-docs+python-stdlib", description="Corpus (as for harvest).")
    context_length: int = Field(default=256, ge=4, description="Tokens per context window.")
    tokens: int = Field(default=800_000, gt=0, description="Activation rows to harvest and train on.")
    expansion_factor: float = Field(default=8.0, gt=0, description="Latents per input dimension.")
    k: int = Field(default=32, gt=0, description="Active latents per token (TopK).")
    optimizer: Literal["adam", "signum"] | None = Field(
        default=None, description="The SAE's optimiser; default the architecture's (TopK: schedule-free "
        "signum).")
    lr: float | None = Field(default=None, gt=0, description="Learning rate; default the optimiser's rule "
                             "in the dictionary size (see saelab train --help).")
    eval_tokens: int = Field(default=4096, ge=0, description="Held-out tokens for the splice evaluation.")
    atlas_tokens: int = Field(default=150_000, gt=0, description="Held-out tokens the atlas reads.")
    seed: int = Field(default=0, description="Training seed.")
    device: str = Field(default="auto", description="Device: auto, cpu, cuda[:N].")
    progress: bool = Field(default=True, description="Show progress bars.")

    @classmethod
    def quick(cls) -> dict[str, Any]:
        """The ``--quick`` preset (a few minutes on a 2-core CPU)."""
        return {"tokens": 250_000, "expansion_factor": 4.0, "eval_tokens": 1024, "atlas_tokens": 40_000}


class LMConfig(_Config):
    """A one-layer (or few-layer) GPT-2-style language model trained from scratch, with its
    own BPE tokenizer (Towards Monosemanticity's subject, at CPU scale)."""

    corpus: str = Field(
        default="sotu+moby-dick+python-docs+python-stdlib",
        description="Training text (as for harvest); documents are split train/held-out by id.",
    )
    heldout_fraction: float = Field(default=0.05, ge=0, lt=1, description="Share of documents held out.")
    vocab_size: int = Field(default=4096, ge=256, le=65535, description="BPE vocabulary size.")
    n_layers: int = Field(default=1, ge=1, le=12, description="Transformer blocks.")
    d_model: int = Field(default=128, ge=8, description="Residual stream width.")
    n_heads: int = Field(default=4, ge=1, description="Attention heads.")
    d_mlp: int = Field(default=512, ge=8, description="MLP neurons per block.")
    activation: Literal["gelu_new", "relu"] = Field(default="gelu_new", description="MLP nonlinearity.")
    context_length: int = Field(default=256, ge=8, le=4096, description="Tokens per training window.")
    batch_size: int = Field(default=64, gt=0, description="Windows per optimiser step.")
    tokens: int = Field(default=30_000_000, gt=0, description="Training budget in tokens.")
    lr: float = Field(default=2e-3, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(default=100, ge=0, description="Linear warm-up steps.")
    min_lr_fraction: float = Field(
        default=0.1, ge=0, le=1, description="Cosine decay ends at this fraction of the peak LR."
    )
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW weight decay (matrices only).")
    precision: Literal["float32", "bfloat16"] = Field(
        default="bfloat16", description="Matmul precision of the training forward (bfloat16 autocast keeps "
        "float32 weights and optimiser state; use float32 on CPUs without bfloat16 support).",
    )
    eval_tokens: int = Field(default=262_144, gt=0, description="Held-out tokens for the held-out loss.")
    eval_every_steps: int = Field(default=250, gt=0, description="Held-out loss interval in steps.")
    checkpoint_every_steps: int = Field(default=100, ge=0, description="Resumable checkpoint interval.")
    seed: int = Field(default=0, description="Seed of the init and the window order.")
    device: str = Field(default="auto", description="Device: auto, cpu, cuda[:N].")
    progress: bool = Field(default=True, description="Show progress bars.")

    @model_validator(mode="after")
    def _check_heads(self) -> LMConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        return self

    def steps(self) -> int:
        """Optimiser steps: enough to read at least ``tokens`` tokens."""
        return max(1, -(-self.tokens // (self.batch_size * self.context_length)))


def _text_default(name: str) -> str:
    return f"{TextConfig.model_fields[name].get_default()}"


class EvalConfig(_Config):
    """Measuring an SAE: on stored activations (``--acts``), or spliced into its model."""

    model: str | None = Field(default=None, description="Model to splice into [default: from cfg.json].")
    hook: str | None = Field(default=None, description="Hook point [default: from cfg.json].")
    corpus: str | None = Field(default=None, description="Corpus whose held-out documents are used "
                               f"[default: {_text_default('corpus')}].")
    tokens: int = Field(default=4096, gt=0, description="Held-out tokens to evaluate.")
    context_length: int | None = Field(default=None, ge=4, description="Tokens per window "
                                       f"[default: {_text_default('context_length')}].")
    windows: int | None = Field(default=None, gt=0, description="Windows per forward pass "
                                f"[default: {_text_default('batch_size')}].")
    heldout_fraction: float | None = Field(
        default=None, ge=0, lt=1, description="Share of documents held out; keep what the harvest used "
        f"[default: {_text_default('heldout_fraction')}].")
    max_rows: int | None = Field(default=None, gt=0, description="With --acts: at most this many rows.")
    batch_size: int = Field(default=8192, gt=0, description="With --acts: rows per batch.")
    drop_nonfinite: bool = Field(default=False, description="With --acts: skip rows with NaN/Inf.")
    allow_incomplete: bool = Field(default=False, description="With --acts: read a store whose "
                                   "harvest stopped early (refused by default).")
    device: str = Field(default="auto", description="Device for the model: auto, cpu, cuda[:N].")

    def text(self) -> TextConfig:
        """The held-out text of a splice evaluation (TextConfig's defaults where unset)."""
        given = {"corpus": self.corpus, "context_length": self.context_length, "batch_size": self.windows,
                 "heldout_fraction": self.heldout_fraction, "device": self.device}
        return build(TextConfig, **{k: v for k, v in given.items() if v is not None})


class BenchConfig(_Config):
    """The report card: each metric on each SAE (``saelab bench``)."""

    metrics: list[str] = Field(default_factory=lambda: ["core", "sparse_probing"],
                               description="Metrics to run, comma-separated: core, sparse_probing.")
    model: str | None = Field(default=None, description="Model [default: from each SAE's cfg.json].")
    hook: str | None = Field(default=None, description="Hook point [default: from each SAE's cfg.json].")
    corpus: str | None = Field(default=None, description="core: corpus whose held-out documents are "
                               f"spliced into [default: {_text_default('corpus')}].")
    tokens: int = Field(default=4096, gt=0, description="core: held-out tokens of the splice evaluation.")
    per_class: int = Field(default=200, ge=10, description="sparse_probing: examples of each label per task.")
    probe_context: int = Field(default=128, ge=8, description="sparse_probing: tokens per example at most.")
    code_passages: int = Field(default=200, gt=0, description="sparse_probing: Python passages the token "
                               "tasks draw from.")
    device: str = Field(default="auto", description="Device: auto, cpu, cuda[:N].")
    progress: bool = Field(default=True, description="Show progress bars.")

    @field_validator("metrics")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        known = ("core", "sparse_probing")
        bad = [m for m in value if m not in known]
        if bad or not value:
            raise ValueError(f"unknown metric(s) {', '.join(bad) or '(none given)'}; choose from "
                             f"{', '.join(known)}")
        return value


class ServeConfig(_Config):
    """The atlas viewer."""

    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port.")
    live: bool = Field(default=True, description="Load the model and SAE for the live text box and steering.")
    sae: str | None = Field(default=None, description="SAE folder for the live box "
                            "[default: the one the atlas records].")
    device: str = Field(default="auto", description="Device for the live model.")
    max_chars: int = Field(default=2000, gt=0, description="Live text limit in characters.")
    max_tokens: int = Field(default=256, gt=0, description="Live text limit in tokens.")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        default="warning", description="uvicorn log level.")
    name: str | None = Field(default=None, description="This atlas's name in the links "
                             "[default: its file name].")
    docs: bool = Field(default=False, description="Also serve the API's interactive docs at /api/docs.")


class SteerConfig(_Config):
    """Steering a model's generation with SAE features (what to generate; which features and
    how to change them are the command's own flags)."""

    prompt: str = Field(min_length=1, description="Text to continue.")
    max_new_tokens: int = Field(default=40, ge=1, le=1024, description="Tokens to generate.")
    model: str | None = Field(default=None, description="Model [default: from the SAE's cfg.json].")
    hook: str | None = Field(default=None, description="Hook point [default: from the SAE's cfg.json].")
    device: str = Field(default="auto", description="Device: auto, cpu, cuda[:N].")


class SplitConfig(_Config):
    """Feature splitting between two dictionaries on the same hook."""

    rows: int = Field(default=20_000, gt=0, description="Rows of --acts to use for correlations.")
    min_cosine: float = Field(default=0.4, ge=-1, le=1, description="Decoder cosine a descendant needs.")
    top: int = Field(default=8, gt=0, description="Descendants listed per feature.")
    families: int = Field(default=10, gt=0, description="Families listed without --feature.")
