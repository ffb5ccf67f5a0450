"""Typed, validated configuration for every stage, grouped by stage.

Each config is a pydantic model whose field descriptions double as the CLI's ``--help``:
:func:`add_arguments` turns a model into argparse flags and :func:`from_args` turns the
parsed flags back into a validated model. Validation happens once, here, at the boundary.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from saelab.errors import SaelabError

Architecture = Literal["relu", "topk", "batchtopk", "jumprelu", "gated"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
DType = Literal["float32", "bfloat16", "float16"]

FORMAT_VERSION = 1
"""Version of the on-disk SAE / checkpoint format written by this saelab."""


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SAEConfig(_Config):
    """What defines a trained SAE: enough to rebuild it and to know what it reads."""

    architecture: Architecture = Field(description="SAE architecture.")
    d_in: int = Field(gt=0, description="Width of the activations the SAE reads.")
    n_latents: int = Field(gt=0, description="Number of dictionary latents (d_sae).")
    k: int | None = Field(
        default=None, gt=0, description="Active latents per row (topk) or on average (batchtopk)."
    )
    dtype: DType = Field(default="float32", description="Parameter dtype.")
    hook_name: str | None = Field(default=None, description="Model hook point the SAE reads.")
    model_name: str | None = Field(default=None, description="Model the activations came from.")
    activation_norm_scale: float = Field(
        default=1.0,
        gt=0,
        description="Inputs were multiplied by this during training so E||x||^2 = d_in; "
        "it is folded into the saved weights.",
    )
    train: dict[str, Any] = Field(
        default_factory=dict, description="The training config that produced this SAE."
    )

    @model_validator(mode="after")
    def _check_k(self) -> SAEConfig:
        if self.architecture in ("topk", "batchtopk"):
            if self.k is None:
                raise ValueError(f"architecture {self.architecture!r} needs k")
            if self.k >= self.n_latents:
                raise ValueError(
                    f"k = {self.k} must be smaller than n_latents = {self.n_latents}"
                )
        return self


class TrainConfig(_Config):
    """How to train an SAE. Coefficients are in normalised units (E||x||^2 = d_in)."""

    architecture: Architecture = Field(default="topk", description="SAE architecture.")
    n_latents: int | None = Field(
        default=None, gt=0, description="Dictionary size; default expansion_factor * d_in."
    )
    expansion_factor: float = Field(
        default=8.0, gt=0, description="n_latents = expansion_factor * d_in when n_latents unset."
    )
    k: int = Field(default=32, gt=0, description="Active latents per row (topk, batchtopk).")
    l1_coefficient: float = Field(
        default=5.0, ge=0, description="Decoder-norm-weighted L1 coefficient (relu, gated)."
    )
    l0_coefficient: float = Field(
        default=0.05, ge=0, description="L0 penalty coefficient (jumprelu)."
    )
    jumprelu_bandwidth: float = Field(
        default=0.05, gt=0, description="Straight-through estimator kernel width (jumprelu)."
    )
    jumprelu_init_threshold: float = Field(
        default=0.1, gt=0, description="Initial per-latent threshold (jumprelu)."
    )
    aux_k_coefficient: float = Field(
        default=1 / 32, ge=0, description="Weight of the AuxK dead-latent loss (topk, batchtopk)."
    )
    k_aux: int | None = Field(
        default=None, gt=0, description="Dead latents used by AuxK; default d_in // 2."
    )
    dead_after_tokens: int = Field(
        default=10_000_000, gt=0, description="A latent is dead after this many rows without firing."
    )
    resample_every_steps: int | None = Field(
        default=None,
        gt=0,
        description="Resample dead latents every N steps (relu, gated; Towards Monosemanticity).",
    )
    tokens: int = Field(
        default=2_000_000, gt=0, description="Training budget in rows (passes over the data as needed)."
    )
    batch_size: int = Field(default=4096, gt=0, description="Rows per optimiser step.")
    lr: float | None = Field(
        default=None, gt=0, description="Adam learning rate; default 2e-4 / sqrt(n_latents / 2^14)."
    )
    lr_warmup_steps: int | None = Field(
        default=None, ge=0, description="Linear LR warm-up steps; default min(1000, 5% of steps)."
    )
    lr_decay_fraction: float = Field(
        default=0.2, ge=0, le=1, description="LR decays linearly to 0 over this last fraction."
    )
    l1_warmup_fraction: float = Field(
        default=0.05, ge=0, le=1, description="Sparsity coefficient ramps up over this first fraction."
    )
    normalize_inputs: bool = Field(
        default=True, description="Scale inputs so E||x||^2 = d_in (folded back on save)."
    )
    init_scale: Literal["unit", "balanced"] = Field(
        default="unit",
        description="Initial decoder rows of the L1 family (relu, gated): unit norm, or balanced: norm "
        "min(1, sqrt(2 d_in / n_latents)) (W_enc = W_decᵀ alike), so a large dictionary's initial "
        "reconstruction is about x's size instead of n_latents / (2 d_in) times it.",
    )
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = Field(
        default="geometric_median", description="How to initialise the decoder bias."
    )
    seed: int = Field(default=0, description="Random seed (init, data order, resampling).")
    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    dtype: DType = Field(default="float32", description="Parameter dtype.")
    matmul_dtype: Literal["bfloat16", "float16"] | None = Field(
        default=None,
        description="Mixed precision: run the dense matmuls (the encoder's, most of the cost) in "
        "this dtype under torch.autocast, keeping parameters, Adam state, the loss and the sparse "
        "TopK backward in `dtype`. bfloat16 runs the encoder about 2-3x faster on CPUs with "
        "AVX512-BF16/AMX and on recent GPUs. Default: everything in `dtype`.",
    )
    checkpoint_every_steps: int = Field(
        default=200, ge=0, description="Write a resumable checkpoint every N steps (0: never)."
    )
    log_every_steps: int = Field(default=20, gt=0, description="Metrics log interval in steps.")
    drop_nonfinite: bool = Field(
        default=False, description="Skip rows containing NaN/Inf instead of refusing the data."
    )
    hook_name: str | None = Field(default=None, description="Hook point recorded in cfg.json.")
    model_name: str | None = Field(default=None, description="Model name recorded in cfg.json.")
    progress: bool = Field(default=True, description="Show a progress bar.")

    def resolve_n_latents(self, d_in: int) -> int:
        return self.n_latents if self.n_latents is not None else int(self.expansion_factor * d_in)

    def sae_config(self, d_in: int) -> SAEConfig:
        """The SAE this training run produces, for inputs of width ``d_in``."""
        n_latents = self.resolve_n_latents(d_in)
        try:
            return SAEConfig(
                architecture=self.architecture,
                d_in=d_in,
                n_latents=n_latents,
                k=self.k if self.architecture in ("topk", "batchtopk") else None,
                dtype=self.dtype,
                hook_name=self.hook_name,
                model_name=self.model_name,
                train=self.model_dump(exclude={"progress"}),
            )
        except ValidationError as e:
            raise SaelabError(f"bad SAE settings: {validation_message(e)}") from None

    def steps(self) -> int:
        return max(1, self.tokens // self.batch_size)

    @model_validator(mode="after")
    def _init_scale_applies(self) -> TrainConfig:
        # Only the L1 family has free decoder norms; elsewhere the setting means nothing, so it
        # is kept at its default (a sweep over architectures gives it to every cell).
        if self.architecture not in ("relu", "gated") and self.init_scale != "unit":
            object.__setattr__(self, "init_scale", "unit")
        return self

    @model_validator(mode="after")
    def _check_matmul_dtype(self) -> TrainConfig:
        if self.matmul_dtype is not None and self.dtype != "float32" and self.matmul_dtype != self.dtype:
            raise ValueError(f"matmul_dtype {self.matmul_dtype} mixes with float32 parameters, not "
                             f"dtype {self.dtype}; use dtype float32, or leave matmul_dtype unset")
        return self

    @model_validator(mode="after")
    def _check_resample(self) -> TrainConfig:
        if self.resample_every_steps is not None and self.architecture not in ("relu", "gated"):
            raise ValueError(
                "resample_every_steps applies to the L1 family (relu, gated); "
                f"{self.architecture} uses AuxK for dead latents"
            )
        return self


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
    lr: float = Field(default=1e-3, gt=0, description="Adam learning rate.")
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


def validation_message(err: ValidationError) -> str:
    """One readable line from a pydantic error: 'field: problem; field: problem'."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc.replace('_', '-')}: {msg}" if e["loc"] else msg)
    return "; ".join(parts)


def build(cls: type[BaseModel], /, **values: Any) -> Any:
    """Validate ``values`` into ``cls``, turning errors into one-line SaelabErrors."""
    try:
        return cls(**values)
    except ValidationError as e:
        raise SaelabError(f"invalid {cls.__name__}: {validation_message(e)}") from None


# ---------------------------------------------------------------------------------------
# argparse generated from the models
# ---------------------------------------------------------------------------------------


def _scalar_type(annotation: Any) -> tuple[Any, list[Any] | None]:
    """Reduce an annotation to (python type, choices) for argparse."""
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return _scalar_type(args[0])
    if origin is Literal:
        choices = list(get_args(annotation))
        return type(choices[0]), choices
    return annotation, None


def add_arguments(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    exclude: set[str] = frozenset(),  # type: ignore[assignment]
    group_title: str | None = None,
) -> None:
    """Add one ``--flag`` per field of ``model`` (defaults left unset so None means 'default')."""
    target: Any = parser.add_argument_group(group_title) if group_title else parser
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        flag = "--" + name.replace("_", "-")
        typ, choices = _scalar_type(field.annotation)
        required = field.is_required()
        default = None if required else field.get_default(call_default_factory=True)
        suffix = " [required]" if required else f" [default: {default}]" if default is not None else ""
        help_text = (field.description or "") + suffix
        help_text = help_text.replace("%", "%%")  # argparse %-formats help strings
        if typ is bool:
            target.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            target.add_argument(
                flag,
                dest=name,
                type=typ,
                choices=choices,
                default=None,
                required=required,
                help=help_text,
                metavar=None if choices else name.upper(),
            )


def from_args(model: type[BaseModel], args: argparse.Namespace, /, **overrides: Any) -> Any:
    """Build ``model`` from the flags the user actually set (plus ``overrides``)."""
    values = {
        name: getattr(args, name)
        for name in model.model_fields
        if getattr(args, name, None) is not None
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return build(model, **values)
