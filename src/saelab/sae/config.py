"""What defines a trained SAE (:class:`SAEConfig`), and reading the configs of older formats.

An SAE's config holds its size, what it reads (model, hook), the input scale folded into its
weights, and its architecture's own config (``sae``: a :class:`~saelab.sae.arch.ArchConfig`).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, SerializeAsAny, field_validator, model_validator

from saelab.config_base import Config, DType
from saelab.sae.arch import V1_RENAMES, ArchConfig, arch_config, fold_shorthand


class SAEConfig(Config):
    """What defines a trained SAE: enough to rebuild it and to know what it reads.

    The architecture's settings may be given flat (``SAEConfig(architecture="topk", k=32,
    d_in=..., n_latents=...)``) or as ``sae=TopKConfig(k=32)``."""

    d_in: int = Field(gt=0, description="Width of the activations the SAE reads.")
    n_latents: int = Field(gt=0, description="Number of dictionary latents (d_sae).")
    sae: SerializeAsAny[ArchConfig] = Field(description="The architecture and its settings.")
    dtype: DType = Field(default="float32", description="Parameter dtype.")
    d_out: int | None = Field(
        default=None, gt=0, description="Width of what it reconstructs, when that is another hook point "
        "than it reads (a transcoder); None: d_in.")
    hook_name: str | None = Field(default=None, description="Model hook point the SAE reads.")
    hook_name_out: str | None = Field(
        default=None, description="Hook point it reconstructs, when not the one it reads (a transcoder).")
    model_name: str | None = Field(default=None, description="Model the activations came from.")
    activation_norm_scale: float = Field(
        default=1.0,
        gt=0,
        description="Inputs were multiplied by this during training so E||x||^2 = d_in; "
        "it is folded into the saved weights.",
    )
    target_norm_scale: float | None = Field(
        default=None, gt=0, description="Likewise for the target of a transcoder (None: the input's).")
    train: dict[str, Any] = Field(
        default_factory=dict, description="The training config that produced this SAE."
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        if "sae" not in values and "architecture" not in values:
            raise ValueError("say which architecture: architecture=... (or sae=...)")
        return fold_shorthand(values, set(cls.model_fields), default_architecture="topk")

    @field_validator("sae", mode="before")
    @classmethod
    def _arch(cls, value: Any) -> Any:
        return arch_config(value)

    @model_validator(mode="after")
    def _fits(self) -> SAEConfig:
        self.sae.check(self.d_in, self.n_latents)
        return self

    @property
    def architecture(self) -> str:
        return self.sae.architecture

    @property
    def d_target(self) -> int:
        """Width of the reconstruction."""
        return self.d_out if self.d_out is not None else self.d_in

    @property
    def k(self) -> int | None:
        """Active latents per row, for the k-sparse architectures (else None)."""
        return getattr(self.sae, "k", None)


# ---------------------------------------------------------------------------------------
# format 1 (saelab 0.4): every architecture's settings flat in one training config
# ---------------------------------------------------------------------------------------

def migrate_train_v1(flat: dict[str, Any]) -> dict[str, Any]:
    """A format-1 training config (flat) in format 2: the architecture's settings move into
    ``sae``; the other architectures' settings, which format 1 kept at their defaults, go."""
    settings = {name for cls in ArchConfig.registry.values() for name in cls.model_fields}
    shared = {k for k in flat if V1_RENAMES.get(k, k) not in settings}
    return fold_shorthand(flat, shared, default_architecture="topk", strict=False)


def migrate_sae_v1(block: dict[str, Any]) -> dict[str, Any]:
    """A format-1 ``saelab`` block of cfg.json (or a checkpoint's ``sae_config``) in format 2."""
    train = migrate_train_v1(block.get("train") or {}) if block.get("train") else {}
    arch = block["architecture"]
    sae = dict(train.get("sae") or {"architecture": arch})
    if block.get("k") is not None:
        sae["k"] = block["k"]
    sae["architecture"] = arch
    kept = {k: v for k, v in block.items() if k in SAEConfig.model_fields and k not in ("sae", "train")}
    return {**kept, "sae": sae, "train": train}
