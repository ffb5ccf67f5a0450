"""How to train an SAE: the settings every architecture shares, and the architecture's own
config (``sae``, one of the :class:`~saelab.sae.arch.ArchConfig` classes)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator

from saelab.config_base import Config, DType, validation_message
from saelab.errors import SaelabError
from saelab.sae import ArchConfig, SAEConfig
from saelab.sae.arch import arch_config, fold_shorthand
from saelab.sae.topk import TopKConfig
from saelab.train.optim import OptimizerName


class TrainConfig(Config):
    """How to train an SAE: the settings every architecture shares, and ``sae``, the
    architecture's own config. Coefficients are in normalised units (E||x||^2 = d_in).

    The architecture's settings may also be given flat: ``TrainConfig(architecture="relu",
    l1_coefficient=2)`` is ``TrainConfig(sae=ReluConfig(l1_coefficient=2))``; a setting the
    architecture does not have is an error."""

    sae: SerializeAsAny[ArchConfig] = Field(
        default_factory=TopKConfig, description="The architecture and its settings [default: topk].")
    n_latents: int | None = Field(
        default=None, gt=0, description="Dictionary size; default expansion_factor * d_in."
    )
    expansion_factor: float = Field(
        default=8.0, gt=0, description="n_latents = expansion_factor * d_in when n_latents unset."
    )
    dead_after_tokens: int = Field(
        default=10_000_000, gt=0, description="A latent is dead after this many rows without firing."
    )
    tokens: int = Field(
        default=2_000_000, gt=0, description="Training budget in rows (passes over the data as needed)."
    )
    batch_size: int = Field(default=4096, gt=0, description="Rows per optimiser step.")
    optimizer: OptimizerName | None = Field(
        default=None,
        description="'signum': sign descent under schedule-free averaging (sparsify's default; the "
        "saved SAE is the average of the iterates, no LR schedule needed); 'adam': Adam with "
        "linear warm-up and decay (the TopK paper's). Default: the architecture's "
        "(signum for topk and the transcoders, adam for the others).",
    )
    lr: float | None = Field(
        default=None, gt=0, description="Learning rate; default adam 2e-4 / sqrt(n_latents / 2^14), "
        "signum 2.5e-3 / sqrt(n_latents / 2^14)."
    )
    lr_warmup_steps: int | None = Field(
        default=None, ge=0, description="Linear LR warm-up steps; default adam min(1000, 5% of "
        "steps), signum 0."
    )
    lr_decay_fraction: float | None = Field(
        default=None, ge=0, le=1, description="LR decays linearly to 0 over this last fraction of the "
        "steps; default adam 0.2, signum 0 (its average needs no decay)."
    )
    normalize_inputs: bool = Field(
        default=True, description="Scale inputs so E||x||^2 = d_in (folded back on save)."
    )
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = Field(
        default="geometric_median", description="How to initialise the decoder bias."
    )
    seed: int = Field(default=0, description="Random seed (init, data order, resampling).")
    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    dtype: DType = Field(default="float32", description="Parameter dtype.")
    matmul_dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = Field(
        default="auto",
        description="Mixed precision: run the dense matmuls (the encoder's, most of the cost) in "
        "this dtype under torch.autocast, keeping parameters, optimiser state, the loss and the "
        "sparse TopK backward in `dtype`. 'auto' times one bfloat16 and one float32 matmul of the "
        "run's shape at the start and takes bfloat16 only where it is faster (CPUs with "
        "AVX512-BF16/AMX, recent GPUs; not an AVX2-only CPU, where it is about 9x slower); "
        "'float32' (or unset) keeps everything in `dtype`.",
    )
    checkpoint_every_steps: int = Field(
        default=200, ge=0, description="Write a resumable checkpoint every N steps (0: never)."
    )
    log_every_steps: int = Field(default=20, gt=0, description="Metrics log interval in steps.")
    drop_nonfinite: bool = Field(
        default=False, description="Skip rows containing NaN/Inf instead of refusing the data."
    )
    allow_incomplete: bool = Field(
        default=False, description="Train on a store whose harvest stopped before its --tokens "
        "(refused by default: it holds fewer rows than asked).")
    hook_name: str | None = Field(default=None, description="Hook point recorded in cfg.json.")
    hook_name_out: str | None = Field(
        default=None, description="Target hook point recorded in cfg.json (a transcoder's).")
    model_name: str | None = Field(default=None, description="Model name recorded in cfg.json.")
    progress: bool = Field(default=True, description="Show a progress bar.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        if set(values) <= set(cls.model_fields):
            return values
        return fold_shorthand(values, set(cls.model_fields), default_architecture="topk")

    @field_validator("sae", mode="before")
    @classmethod
    def _arch(cls, value: Any) -> Any:
        return arch_config(value)

    @property
    def architecture(self) -> str:
        return self.sae.architecture

    def resolve_n_latents(self, d_in: int) -> int:
        return self.n_latents if self.n_latents is not None else int(self.expansion_factor * d_in)

    def sae_config(self, d_in: int, d_out: int | None = None) -> SAEConfig:
        """The SAE this training run produces, for inputs of width ``d_in`` (and, for a
        transcoder, targets of width ``d_out``)."""
        n_latents = self.resolve_n_latents(d_in)
        try:
            return SAEConfig(
                sae=self.sae,
                d_in=d_in,
                d_out=d_out,
                n_latents=n_latents,
                dtype=self.dtype,
                hook_name=self.hook_name,
                hook_name_out=self.hook_name_out,
                model_name=self.model_name,
                train=self.model_dump(exclude={"progress"}),
            )
        except ValidationError as e:
            raise SaelabError(f"bad SAE settings: {validation_message(e)}") from None

    def steps(self) -> int:
        return max(1, self.tokens // self.batch_size)

    def resolved_optimizer(self) -> str:
        return self.optimizer or self.sae.default_optimizer()

    @model_validator(mode="after")
    def _check_matmul_dtype(self) -> TrainConfig:
        if self.matmul_dtype not in (None, "auto", "float32") and self.dtype != "float32" \
                and self.matmul_dtype != self.dtype:
            raise ValueError(f"matmul_dtype {self.matmul_dtype} mixes with float32 parameters, not "
                             f"dtype {self.dtype}; use dtype float32, or leave matmul_dtype unset")
        return self
