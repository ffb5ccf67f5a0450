"""Transcoder and skip-transcoder (Dunefsky, Chlenski & Nanda 2024; Paulo et al. 2025): a sparse
coder that reads one hook point and reconstructs another — an MLP's input (after its norm,
``blocks.N.ln2.hook_normalized``) to its output (``blocks.N.hook_mlp_out``) — so its latents
are the features the MLP computes with, and the MLP can be replaced by it:

    ŷ = z W_dec + b_dec (+ x W_skip),   z = TopK(x W_enc + b_enc)

The input is not centred by b_dec (it lives in another space than the output) but by its own
centre, set from the data and folded into b_enc when the coder is saved. The optional
linear skip connection (``skip``) carries the part of the MLP that is close to linear, so the
latents need not spend themselves on it. Training reads row-aligned (input, target) pairs
(:class:`~saelab.activations.source.PairedSource`); TopK selection and AuxK work as for a TopK
SAE, the residual being the target's.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from saelab.sae.arch import KSparseConfig
from saelab.sae.base import Codes, TrainContext
from saelab.sae.config import SAEConfig
from saelab.sae.topk import TopKSAE


class TranscoderConfig(KSparseConfig):
    """Transcoder: TopK latents of one hook point that reconstruct another (with ``skip``: plus a
    linear skip connection, a skip-transcoder)."""

    architecture: Literal["transcoder"] = "transcoder"
    skip: bool = Field(default=False,
                       description="Add a linear skip connection x W_skip (a skip-transcoder).")

    def default_optimizer(self) -> str:
        return "signum"  # benchmarks/peers/time_to_quality.md


class TranscoderSAE(TopKSAE):
    architecture = "transcoder"
    saelens_architecture = "topk"
    reads_pairs = True
    apply_b_dec_to_input = False
    latent_sharding = False
    latent_dims: ClassVar[dict[str, int | None]] = {**TopKSAE.latent_dims, "W_skip": None, "b_in": None}

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        # Where the input is centred during training; folded into b_enc on saving (then zero).
        self.register_buffer("b_in", torch.zeros(cfg.d_in, dtype=self.W_dec.dtype))
        if cfg.sae.skip:  # type: ignore[attr-defined]
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, self.d_target, dtype=self.W_dec.dtype))

    @property
    def has_skip(self) -> bool:
        return bool(self.cfg.sae.skip)  # type: ignore[attr-defined]

    def centered(self, x: Tensor) -> Tensor:
        return x - self.b_in

    def init_input_centre(self, centre: Tensor) -> None:
        self.b_in.copy_(centre)

    def skip_term(self, x: Tensor) -> Tensor | None:
        return x @ self.W_skip if self.has_skip else None

    def training_codes(self, x: Tensor, ctx: TrainContext) -> Codes:
        codes = super().training_codes(x, ctx)
        skip = self.skip_term(x)
        if skip is not None:
            codes.extras["skip_BD"] = skip
        return codes

    def decode_codes(self, codes: Codes, ctx: TrainContext) -> Tensor:
        recon = super().decode_codes(codes, ctx)
        return recon + codes.extras["skip_BD"] if "skip_BD" in codes.extras else recon

    @torch.no_grad()
    def fold_input_scale(self, scale: float, target_scale: float | None = None) -> None:
        target_scale = scale if target_scale is None else target_scale
        # (s x − c) W_enc + b_enc = x (s W_enc) + (b_enc − c W_enc): the centre goes into b_enc
        self.b_enc -= self.b_in @ self.W_enc
        self.b_in.zero_()
        super().fold_input_scale(scale, target_scale)
        if self.has_skip:
            self.W_skip *= scale / target_scale

    def saelens_tensors(self) -> dict[str, Tensor]:
        out = super().saelens_tensors()
        if self.has_skip:
            out["W_skip"] = self.W_skip
        return out

    def saelens_fields(self) -> dict[str, Any]:
        return {**super().saelens_fields(), "d_out": self.d_target}
