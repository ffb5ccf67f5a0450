"""What makes one sparse coder different from another: its config.

Each architecture module defines one :class:`ArchConfig` subclass with a literal
``architecture`` field and that architecture's knobs (k, a sparsity coefficient and its
warm-up, a threshold's bandwidth, ...), with a description under each field that becomes the
CLI's help. Defining the class registers it; everything else — the training config's ``sae``
field, the ``saelab train`` flags, the sweep's grid axes and the checks on them — is derived
from the registered classes, so a new architecture touches nothing outside its own module.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from pydantic import Field

from saelab.config_base import Config


class ArchConfig(Config):
    """The base of every architecture's config."""

    architecture: str

    registry: ClassVar[dict[str, type[ArchConfig]]] = {}
    """Every architecture's config class, by its literal ``architecture``."""
    name_field: ClassVar[tuple[str, str] | None] = None
    """(field, short name) that tells a sweep's cells apart, e.g. ("k", "k") -> ``topk-n64-k4``."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        name = cls.model_fields["architecture"].default
        if isinstance(name, str):
            ArchConfig.registry[name] = cls

    # ------------------------------------------------------------------ what the trainer asks
    def sparsity_coefficient(self, step: int, steps: int) -> float:
        """The penalty coefficient λ at ``step`` of ``steps`` (0 for architectures without one)."""
        return 0.0

    def resampling_interval(self) -> int | None:
        """Resample dead latents every N steps (Towards Monosemanticity), or never."""
        return None

    def initial_decoder_norm(self, d_in: int, n_latents: int) -> float:
        """Norm of the initial decoder rows (and encoder columns)."""
        return 1.0

    def default_optimizer(self) -> str:
        """The optimiser a run uses unless its config names one (see TrainConfig.optimizer)."""
        return "adam"

    def check(self, d_in: int, n_latents: int) -> None:
        """Raise ValueError if these settings cannot make an SAE of this size."""


class PenaltyConfig(ArchConfig):
    """Architectures trained with a sparsity penalty whose coefficient ramps up from zero."""

    penalty_field: ClassVar[str]
    coefficient_warmup_fraction: float = Field(
        default=0.05, ge=0, le=1,
        description="The sparsity coefficient ramps up linearly over this first fraction of the steps.",
    )

    def sparsity_coefficient(self, step: int, steps: int) -> float:
        base = float(getattr(self, self.penalty_field))
        warmup = int(self.coefficient_warmup_fraction * steps)
        return base * min(1.0, (step + 1) / warmup) if warmup else base


class KSparseConfig(ArchConfig):
    """Architectures that keep k latents per row (exactly, or on average over a batch), with the
    AuxK loss on dead latents (Gao et al. 2024)."""

    name_field = ("k", "k")
    k: int = Field(default=32, gt=0, description="Active latents per row (exact, or the batch average).")
    aux_k_coefficient: float = Field(
        default=1 / 32, ge=0, description="Weight of the AuxK dead-latent loss (0: off)."
    )
    k_aux: int | None = Field(default=None, gt=0, description="Dead latents used by AuxK; default d_in // 2.")

    def check(self, d_in: int, n_latents: int) -> None:
        if self.k >= n_latents:
            raise ValueError(f"k = {self.k} must be smaller than n_latents = {n_latents}")

    def resolved_k_aux(self, d_in: int) -> int:
        """How many dead latents AuxK reconstructs with (0 when AuxK is off)."""
        if self.aux_k_coefficient <= 0:
            return 0
        return self.k_aux if self.k_aux is not None else max(1, d_in // 2)


def balanced_norm(d_in: int, n_latents: int) -> float:
    """Half the latents of a fresh ReLU dictionary fire: the reconstruction is about
    c² n / (2 d_in) x, so c² = 2 d_in / n makes it about x."""
    return min(1.0, math.sqrt(2 * d_in / n_latents))


# ---------------------------------------------------------------------------------------
# reading an architecture config from plain values
# ---------------------------------------------------------------------------------------


V1_RENAMES = {
    "jumprelu_bandwidth": "bandwidth",
    "jumprelu_init_threshold": "init_threshold",
    "l1_warmup_fraction": "coefficient_warmup_fraction",
}
"""Settings of saelab 0.4 (format 1) that the architecture configs name differently; the old
names are still accepted."""


def config_class(architecture: Any) -> type[ArchConfig]:
    try:
        return ArchConfig.registry[architecture]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown architecture {architecture!r}; choose one of {', '.join(ArchConfig.registry)}"
        ) from None


def arch_config(value: Any) -> Any:
    """An :class:`ArchConfig` from a config object or a dict with an ``architecture`` key (for
    pydantic's before-validators; anything else is passed on for pydantic to refuse)."""
    if isinstance(value, dict):
        return config_class(value.get("architecture")).model_validate(value)
    return value


def owners(field: str) -> list[str]:
    """The architectures that have setting ``field``."""
    return [name for name, cls in ArchConfig.registry.items() if field in cls.model_fields]


def fold_shorthand(values: dict[str, Any], own_fields: set[str], default_architecture: str,
                   strict: bool = True) -> dict[str, Any]:
    """Accept an architecture's settings flat beside a config's own fields (``architecture="relu",
    l1_coefficient=2``) and move them into its ``sae`` field.

    Settings already in ``sae`` are kept where the architecture has them (a changed architecture
    keeps those it shares with the old one). A flat setting the chosen architecture does not have
    is an error naming the architectures that do (``strict``), or is dropped (reading old files,
    whose flat training configs held every architecture's settings)."""
    values = dict(values)
    old = values.pop("sae", None)
    if isinstance(old, ArchConfig):
        old = old.model_dump()
    old = dict(old or {})
    arch = values.pop("architecture", old.get("architecture", default_architecture))
    cls = config_class(arch)
    flat = {V1_RENAMES.get(k, k): values.pop(k) for k in list(values) if k not in own_fields}
    sae: dict[str, Any] = {k: v for k, v in old.items() if k in cls.model_fields}
    for key, value in flat.items():
        if key in cls.model_fields:
            sae[key] = value
        elif strict:
            where = owners(key)
            if where:
                raise ValueError(f"{key} is a setting of {', '.join(where)}, not of "
                                 f"{arch}; leave it out, or choose one of those architectures")
            raise ValueError(f"unknown setting {key}")
    sae["architecture"] = arch
    return {**values, "sae": sae}


def arch_settings() -> dict[str, dict[str, Any]]:
    """Every architecture's settings: name -> {architecture: its field}, in registry order."""
    out: dict[str, dict[str, Any]] = {}
    for arch, cls in ArchConfig.registry.items():
        for name, field in cls.model_fields.items():
            if name != "architecture":
                out.setdefault(name, {})[arch] = field
    return out
