"""The shared SAE base: encode → sparse latents → decode, the shared training loss, and the
on-disk format.

    x̂ = z @ W_dec + b_dec,   z = f((x − b_dec) @ W_enc + b_enc)

Every architecture is one module: its config (an :class:`~saelab.sae.arch.ArchConfig`) and an
:class:`SAE` subclass that names itself with ``architecture`` and implements ``encode``
(inference latents), ``training_codes`` (the batch's latents in training) and, where it has
them, ``auxiliary_losses``. The base writes the rest of the loss once: the decode, the
reconstruction error, the weighted sum, and which latents fired. Saving writes the SAELens
layout: ``cfg.json`` + ``sae_weights.safetensors`` with ``W_enc`` [d_in, d_sae], ``W_dec``
[d_sae, d_in], ``b_enc`` [d_sae], ``b_dec`` [d_in] (and ``threshold`` / gated parameters where
they apply), so a saved folder loads in SAELens.

Shapes are named in suffixes where indexing is heavy: ``B`` rows, ``K`` active latents per row,
``N`` latents, ``D`` input width.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from saelab.activations.hooks import hook_width
from saelab.config_base import FORMAT_VERSION, validation_message
from saelab.errors import InputError
from saelab.io import atomic_save_safetensors, atomic_write_json
from saelab.parallel import SINGLE, Communicator
from saelab.sae.config import SAEConfig, migrate_sae_v1
from saelab.sae.kernels import sparse_decode

if TYPE_CHECKING:
    from saelab.models import LoadedModel

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ForwardOutput(NamedTuple):
    """What one training forward pass returns, so the loss is visible at the call site."""

    recon: Tensor  # x̂, same shape as x
    loss: Tensor  # scalar to minimise
    terms: dict[str, Tensor]  # named parts of the loss (for logging)
    fired: Tensor  # [n_latents] bool: latents that were non-zero somewhere in the batch
    l0: Tensor  # scalar: mean non-zero latents per row


@dataclass
class TrainContext:
    """What the training loop knows at a step and hands to ``training_forward``; each
    architecture's own knobs are in its config (``sae.cfg.sae``)."""

    sparsity_coefficient: float = 0.0  # λ (L1 / L0) at this step, already warmed up
    dead_mask: Tensor | None = None  # [n_latents] bool: latents that have not fired for long
    workspace: dict[str, Tensor] = field(default_factory=dict)  # scratch kept across steps
    comm: Communicator = SINGLE  # the other processes of the run (none by default)


@dataclass
class Codes:
    """A training batch's latents, sparse (``values_BK`` at ``indices_BK``) or dense
    (``dense_BN``), with whatever else the architecture's auxiliary losses need."""

    values_BK: Tensor | None = None
    indices_BK: Tensor | None = None
    dense_BN: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def squared_error(x: Tensor, recon: Tensor) -> Tensor:
    """Mean over rows of ‖x − x̂‖² (summed over features): the reconstruction loss."""
    return (x - recon).pow(2).sum(-1).mean()


def fvu(x: Tensor, recon: Tensor) -> float:
    """FVU of one batch: Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄ the batch mean)."""
    x64, r64 = x.double(), recon.double()
    err = (x64 - r64).pow(2).sum()
    total = (x64 - x64.mean(0)).pow(2).sum()
    return float(err / total.clamp_min(1e-30))


def check_sae_fits(sae: SAE, lm: LoadedModel, hook: str) -> None:
    """Refuse a model hook whose width is not the SAE's input width (and, for a transcoder, an
    output hook whose width is not its output's)."""
    width = hook_width(lm.model, hook)
    if width != sae.d_in:
        raise InputError(
            f"the SAE reads d_in = {sae.d_in} but {lm.name} {hook} is {width} wide; pass the hook "
            "(and model) the SAE was trained on"
        )
    out = sae.cfg.hook_name_out
    if out is not None and hook_width(lm.model, out) != sae.d_target:
        raise InputError(f"the transcoder writes d_out = {sae.d_target} but {lm.name} {out} is "
                         f"{hook_width(lm.model, out)} wide")


class SAE(nn.Module):
    """A sparse autoencoder. Use :meth:`SAE.load` / :meth:`save`; build with :func:`create`."""

    architecture: ClassVar[str]
    saelens_architecture: ClassVar[str]
    unit_norm_decoder: ClassVar[bool] = True
    """Whether decoder rows are kept at unit norm during training (else their norm
    enters the sparsity penalty)."""
    encoder_bias_names: ClassVar[tuple[str, ...]] = ("b_enc",)
    reads_pairs: ClassVar[bool] = False
    """Whether it reconstructs another hook point than it reads (a transcoder): trained on
    row-aligned (input, target) pairs."""
    apply_b_dec_to_input: ClassVar[bool] = True
    """Whether the input is centred by b_dec before encoding (SAELens's field; not when input and
    output are different spaces)."""
    latent_sharding: ClassVar[bool] = False
    """Whether the latents can be split over processes (``--latent-shards``)."""
    latent_dims: ClassVar[dict[str, int | None]] = {"W_enc": 1, "b_dec": None}
    """Which dimension of each parameter or buffer indexes the latents (None: none); 0 if unlisted."""
    registry: ClassVar[dict[str, type[SAE]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "architecture" in cls.__dict__:
            SAE.registry[cls.architecture] = cls

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_in, cfg.n_latents
        dtype = TORCH_DTYPES[cfg.dtype]
        # W_enc is [d_in, n] as in SAELens, but stored so that its transpose (one row per
        # latent) is contiguous: the sparse kernels gather and scatter latent rows.
        self.W_enc = nn.Parameter(torch.zeros(n, d, dtype=dtype).t())
        self.W_dec = nn.Parameter(torch.zeros(n, cfg.d_target, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_target, dtype=dtype))
        if "b_enc" in self.encoder_bias_names:
            self.b_enc = nn.Parameter(torch.zeros(n, dtype=dtype))

    # ----------------------------------------------------------------- properties
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents

    @property
    def d_target(self) -> int:
        """Width of the reconstruction (d_in, or a transcoder's d_out)."""
        return self.cfg.d_target

    @property
    def enc_rows(self) -> Tensor:
        """The encoder as [n_latents, d_in], one contiguous row per latent."""
        return self.W_enc.t().contiguous()

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    # ----------------------------------------------------------------- inference
    def centered(self, x: Tensor) -> Tensor:
        """The encoder's input: x − b_dec (a transcoder centres by its input's own centre)."""
        return x - self.b_dec

    def pre_activations(self, x: Tensor) -> Tensor:
        """(x − b_dec) @ W_enc + b_enc for [..., d_in] inputs."""
        return self.centered(x) @ self.W_enc + self.b_enc

    def init_input_centre(self, centre: Tensor) -> None:
        """Set where the encoder's input is centred, for a coder whose b_dec is the output's (a
        transcoder); an SAE centres by b_dec."""
        raise NotImplementedError(f"{self.architecture} centres its input by b_dec")

    def skip_term(self, x: Tensor) -> Tensor | None:
        """A linear path from input to output added to the reconstruction (a skip-transcoder's)."""
        return None

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents [..., n_latents] (mostly zeros)."""
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec

    def sparse_decode(self, values_BK: Tensor, indices_BK: Tensor) -> Tensor:
        """Σ values · W_dec[indices] per row, without b_dec (touches only the k latents)."""
        return sparse_decode(values_BK, indices_BK, self.W_dec)

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction x̂ of ``x`` (any leading shape, last dim d_in)."""
        self.check_input(x)
        x = x.to(self.W_dec.dtype)
        recon = self.decode(self.encode(x))
        skip = self.skip_term(x)
        return recon if skip is None else recon + skip

    # ----------------------------------------------------------------- training
    def training_codes(self, x: Tensor, ctx: TrainContext) -> Codes:
        """The latents of a [B, d_in] training batch (inputs already normalised)."""
        raise NotImplementedError

    def auxiliary_losses(self, target: Tensor, recon: Tensor, codes: Codes,
                         ctx: TrainContext) -> dict[str, tuple[float, Tensor]]:
        """The architecture's terms beyond the reconstruction error: name -> (weight, value)."""
        return {}

    def decode_codes(self, codes: Codes, ctx: TrainContext) -> Tensor:
        """x̂ from a batch's codes (summed over the latent shards)."""
        if codes.dense_BN is not None:
            return self.decode(codes.dense_BN)
        assert codes.values_BK is not None and codes.indices_BK is not None
        partial = self.sparse_decode(codes.values_BK, codes.indices_BK)
        return ctx.comm.sum_shards(partial) + ctx.comm.shard_bias(self.b_dec)

    def firing(self, codes: Codes, ctx: TrainContext) -> tuple[Tensor, Tensor]:
        """(latents of this shard that fired in the batch [n] bool, mean active latents per row)."""
        if codes.dense_BN is not None:
            active_BN = codes.dense_BN > 0
            return active_BN.any(0), active_BN.sum(-1).float().mean()
        assert codes.values_BK is not None and codes.indices_BK is not None
        on_BK = codes.values_BK > 0
        fired = torch.zeros(self.n_latents, dtype=torch.bool, device=on_BK.device)
        fired[codes.indices_BK[on_BK]] = True
        return fired, ctx.comm.sum_shards_(on_BK.sum(-1).float()).mean()

    def training_forward(self, x: Tensor, ctx: TrainContext, target: Tensor | None = None) -> ForwardOutput:
        """Reconstruction and loss on a [B, d_in] batch (inputs already normalised): ‖y − ŷ‖²
        plus the architecture's weighted auxiliary terms, y = x for an SAE, ``target`` for a
        transcoder."""
        target = x if target is None else target
        codes = self.training_codes(x, ctx)
        recon = self.decode_codes(codes, ctx)
        mse = squared_error(target, recon)
        loss, terms = mse, {"mse": mse.detach()}
        for name, (weight, value) in self.auxiliary_losses(target, recon, codes, ctx).items():
            loss = loss + weight * value
            terms[name] = value.detach()
        fired, l0 = self.firing(codes, ctx)
        return ForwardOutput(recon, loss, terms, fired, l0)

    def check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise InputError(
                f"input width {x.shape[-1]} does not match the SAE's d_in = {self.d_in} "
                f"(shape {tuple(x.shape)}); pass activations from the hook it was trained on"
            )

    # ----------------------------------------------------------------- initialisation
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random decoder rows of the architecture's initial norm (unit by default), W_enc = W_decᵀ,
        zero biases."""
        w = torch.randn(self.n_latents, self.d_in, generator=generator, dtype=torch.float32)
        w /= w.norm(dim=1, keepdim=True)
        if self.reads_pairs:  # input and output are other spaces: independent directions
            self.W_enc.copy_(w.t())
            w = torch.randn(self.n_latents, self.d_target, generator=generator, dtype=torch.float32)
            w /= w.norm(dim=1, keepdim=True)
            self.W_dec.copy_(w)
        else:
            self.W_dec.copy_(w)
            self.W_enc.copy_(w.t())
        for name in self.encoder_bias_names:
            getattr(self, name).zero_()
        self.b_dec.zero_()
        norm = self.cfg.sae.initial_decoder_norm(self.d_in, self.n_latents)
        if norm != 1.0:
            self.W_dec.mul_(norm)
            self.W_enc.mul_(norm)

    # ----------------------------------------------------------------- decoder norms
    def decoder_norms(self) -> Tensor:
        return self.W_dec.norm(dim=1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True).clamp_min_(1e-8))

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Project out the part of W_dec's gradient along each (unit) row."""
        if self.W_dec.grad is None:
            return
        # Row-wise dot products as a batched [1, d] @ [d, 1] (no [n, d] temporary).
        parallel = torch.bmm(self.W_dec.grad.unsqueeze(1), self.W_dec.unsqueeze(2)).view(-1, 1)
        self.W_dec.grad.addcmul_(parallel, self.W_dec, value=-1)

    @torch.no_grad()
    def fold_input_scale(self, scale: float, target_scale: float | None = None) -> None:
        """Make an SAE trained on ``scale · x`` (and, for a transcoder, ``target_scale · y``)
        act on raw ``x``: latents are unchanged, the reconstruction comes out in raw units."""
        target_scale = scale if target_scale is None else target_scale
        self.W_enc *= scale
        self.W_dec /= target_scale
        self.b_dec /= target_scale

    @torch.no_grad()
    def reinit_latents(self, idx: Tensor, directions: Tensor, enc_norm: float) -> None:
        """Point latents ``idx`` at unit ``directions`` [len(idx), d_in] (resampling)."""
        self.W_dec[idx] = directions.to(self.W_dec.dtype)
        self.W_enc[:, idx] = (directions * enc_norm).t().to(self.W_enc.dtype)
        for name in self.encoder_bias_names:
            getattr(self, name)[idx] = 0.0

    # ----------------------------------------------------------------- disk format
    def saelens_tensors(self) -> dict[str, Tensor]:
        """Weights under SAELens names and shapes."""
        out = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        for name in self.encoder_bias_names:
            out[name] = getattr(self, name)
        return out

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        expected = {k: tuple(v.shape) for k, v in self.saelens_tensors().items()}
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise InputError(f"SAE weights lack {', '.join(missing)}")
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise InputError(
                    f"SAE weight {name} has shape {tuple(tensors[name].shape)}, "
                    f"cfg.json implies {shape}"
                )
        self._assign_saelens_tensors(tensors)

    def _assign_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Copy the parameters; subclasses convert derived tensors (``threshold``)."""
        for name, param in self.saelens_tensors().items():
            if isinstance(param, nn.Parameter):
                param.copy_(tensors[name])

    def saelens_cfg(self) -> dict[str, Any]:
        cfg = self.cfg
        names = {
            "model_name": cfg.model_name,
            "hook_name": cfg.hook_name,
            **({"hook_name_out": cfg.hook_name_out} if cfg.hook_name_out else {}),
            "hook_layer": _hook_layer(cfg.hook_name),
            "hook_head_index": None,
        }
        return {
            "architecture": self.saelens_architecture,
            "d_in": cfg.d_in,
            "d_sae": cfg.n_latents,
            "dtype": cfg.dtype,
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
            # SAELens 6 reads the names from ``metadata`` when the folder says which SAELens 6
            # wrote it, and from the top level otherwise (which is where saelab writes them for
            # it, claiming no SAELens version); saelab 0.4 reads ``meta``
            **names,
            "metadata": names,
            "meta": names,
            **self.saelens_fields(),
        }

    def saelens_fields(self) -> dict[str, Any]:
        """The architecture's own top-level cfg.json fields that SAELens reads."""
        return {}

    def save(self, path: str | Path) -> Path:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` into folder ``path``.

        Each file is replaced atomically; the config is written last, so a folder with a
        cfg.json always has the weights it describes.
        """
        from saelab import __version__

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(
            self.saelens_tensors(),
            path / WEIGHTS_FILENAME,
            metadata={"format": "saelab", "format_version": str(FORMAT_VERSION)},
        )
        cfg = self.saelens_cfg()
        cfg["saelab"] = {
            "format_version": FORMAT_VERSION,
            "saelab_version": __version__,
            **self.cfg.model_dump(),
        }
        atomic_write_json(path / CFG_FILENAME, cfg)
        return path

    @staticmethod
    def load(path: str | Path, device: str | torch.device = "cpu") -> SAE:
        """Load an SAE folder written by saelab, SAELens, sparsify or dictionary_learning."""
        from saelab.sae import foreign

        path = Path(path)
        cfg_path, weights_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
        kind = foreign.detect(path)
        if kind not in (None, "saelab"):
            return foreign.load_foreign(path, kind).to(device)
        if not cfg_path.is_file():
            raise InputError(foreign.describe_missing(path))
        if not weights_path.is_file():
            raise InputError(f"{path} has {CFG_FILENAME} but no {WEIGHTS_FILENAME}")
        try:
            raw = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{cfg_path} is not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise InputError(f"{cfg_path} holds a JSON {type(raw).__name__}, not the object of an SAE's "
                             "settings (d_in, d_sae, architecture, ...)")
        cfg = _sae_config_from_json(raw, cfg_path)
        try:
            tensors = load_file(str(weights_path), device=str(device))
        except (SafetensorError, OSError) as e:
            raise InputError(f"cannot read {weights_path}: {e}") from None
        sae = create(cfg).to(device)
        sae.load_saelens_tensors(tensors)
        return sae


def _hook_layer(hook_name: str | None) -> int | None:
    if hook_name and hook_name.startswith("blocks."):
        part = hook_name.split(".")[1]
        if part.isdigit():
            return int(part)
    return None


_FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}


def _sae_config_from_json(raw: dict[str, Any], where: Path) -> SAEConfig:
    ours = raw.get("saelab")
    try:
        if ours is not None:
            version = ours.get("format_version")
            if not isinstance(version, int) or version > FORMAT_VERSION:
                raise InputError(
                    f"{where} has format_version {version!r}; this saelab reads up to "
                    f"{FORMAT_VERSION}: upgrade saelab"
                )
            if version < 2:
                ours = migrate_sae_v1(ours)
            fields = {k: v for k, v in ours.items() if k in SAEConfig.model_fields}
            return SAEConfig(**fields)
        arch = _FROM_SAELENS.get(raw.get("architecture", "standard"))
        if arch is None:
            raise InputError(
                f"{where}: SAELens architecture {raw.get('architecture')!r} is not supported "
                f"(supported: {', '.join(_FROM_SAELENS)})"
            )
        _refuse_other_computations(raw, arch, where)
        meta = raw.get("metadata") or raw.get("meta") or {}
        return SAEConfig(
            architecture=arch,  # type: ignore[arg-type]
            d_in=raw["d_in"],
            n_latents=raw["d_sae"],
            **({"k": raw["k"]} if arch == "topk" and raw.get("k") is not None else {}),
            dtype=raw.get("dtype", "float32"),
            hook_name=meta.get("hook_name", raw.get("hook_name")),
            model_name=meta.get("model_name", raw.get("model_name")),
        )
    except ValidationError as e:
        raise InputError(f"{where}: {validation_message(e)}") from None
    except KeyError as e:
        raise InputError(f"{where} lacks the field {e.args[0]!r}") from None


# SAELens settings that change what the SAE computes, and the value saelab computes with.
_SAELENS_AS_SAELAB: dict[str, tuple[Any, ...]] = {
    "normalize_activations": ("none", None),
    "rescale_acts_by_decoder_norm": (False, None),
    "reshape_activations": ("none", None),
    "hook_head_index": (None,),
}


def _refuse_other_computations(raw: dict[str, Any], arch: str, where: Path) -> None:
    """A SAELens folder whose settings make SAELens compute something saelab does not is
    refused, naming the setting, rather than loaded to give other outputs."""
    meta = raw.get("metadata") or raw.get("meta") or {}
    for name, ours in _SAELENS_AS_SAELAB.items():
        value = raw.get(name)
        if value is None and name == "hook_head_index":
            value = meta.get(name)  # SAELens 6 keeps it in metadata, older ones at the top
        if value not in ours:
            raise InputError(
                f"{where}: SAELens setting {name} = {value!r} is not implemented in saelab (it computes "
                f"as {name} = {ours[0]!r}); loading it would give other outputs than SAELens")
    expected = SAE.registry[arch].apply_b_dec_to_input
    value = raw.get("apply_b_dec_to_input", expected)
    if value != expected:
        raise InputError(
            f"{where}: SAELens setting apply_b_dec_to_input = {value!r} is not implemented for "
            f"{arch} in saelab (it computes as {expected!r}); loading it would give other outputs")


def create(cfg: SAEConfig) -> SAE:
    """A freshly initialised SAE of ``cfg.architecture``."""
    try:
        cls = SAE.registry[cfg.architecture]
    except KeyError:
        raise InputError(
            f"unknown architecture {cfg.architecture!r}; choose one of {', '.join(SAE.registry)}"
        ) from None
    sae = cls(cfg)
    sae.init_weights()
    return sae
