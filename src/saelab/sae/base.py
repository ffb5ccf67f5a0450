"""The shared SAE base: encode → sparse latents → decode, and the on-disk format.

    x̂ = z @ W_dec + b_dec,   z = f((x − b_dec) @ W_enc + b_enc)

Every architecture subclasses :class:`SAE`, names itself with ``architecture``, and
implements ``encode`` (inference latents) and ``training_forward`` (its loss). Saving
writes the SAELens layout: ``cfg.json`` + ``sae_weights.safetensors`` with ``W_enc``
[d_in, d_sae], ``W_dec`` [d_sae, d_in], ``b_enc`` [d_sae], ``b_dec`` [d_in] (and
``threshold`` / gated parameters where they apply), so a saved folder loads in SAELens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from saelab.config import FORMAT_VERSION, SAEConfig, validation_message
from saelab.errors import InputError
from saelab.io import atomic_save_safetensors, atomic_write_json

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
    """Per-step knobs the trainer hands to ``training_forward``."""

    sparsity_coefficient: float = 0.0  # λ (L1 / L0), already warmed up
    aux_k_coefficient: float = 0.0
    k_aux: int = 0
    dead_mask: Tensor | None = None  # [n_latents] bool
    jumprelu_bandwidth: float = 0.05
    workspace: dict[str, Tensor] = field(default_factory=dict)  # scratch kept across steps


def squared_error(x: Tensor, recon: Tensor) -> Tensor:
    """Mean over rows of ‖x − x̂‖² (summed over features): the reconstruction loss."""
    return (x - recon).pow(2).sum(-1).mean()


class SAE(nn.Module):
    """A sparse autoencoder. Use :meth:`SAE.load` / :meth:`save`; build with :func:`create`."""

    architecture: ClassVar[str]
    saelens_architecture: ClassVar[str]
    unit_norm_decoder: ClassVar[bool] = True
    """Whether decoder rows are kept at unit norm during training (else their norm
    enters the sparsity penalty)."""
    encoder_bias_names: ClassVar[tuple[str, ...]] = ("b_enc",)
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
        self.W_dec = nn.Parameter(torch.zeros(n, d, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d, dtype=dtype))
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
    def enc_rows(self) -> Tensor:
        """The encoder as [n_latents, d_in], one contiguous row per latent."""
        return self.W_enc.t().contiguous()

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    # ----------------------------------------------------------------- inference
    def pre_activations(self, x: Tensor) -> Tensor:
        """(x − b_dec) @ W_enc + b_enc for [..., d_in] inputs."""
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents [..., n_latents] (mostly zeros)."""
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction x̂ of ``x`` (any leading shape, last dim d_in)."""
        self.check_input(x)
        return self.decode(self.encode(x.to(self.W_dec.dtype)))

    def training_forward(self, x: Tensor, ctx: TrainContext) -> ForwardOutput:
        """Reconstruction and loss on a [B, d_in] batch (inputs already normalised)."""
        raise NotImplementedError

    def check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise InputError(
                f"input width {x.shape[-1]} does not match the SAE's d_in = {self.d_in} "
                f"(shape {tuple(x.shape)}); pass activations from the hook it was trained on"
            )

    # ----------------------------------------------------------------- initialisation
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows, W_enc = W_decᵀ, zero biases."""
        w = torch.randn(self.n_latents, self.d_in, generator=generator, dtype=torch.float32)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.t())
        for name in self.encoder_bias_names:
            getattr(self, name).zero_()
        self.b_dec.zero_()

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
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on ``scale · x`` act on raw ``x``: latents are unchanged,
        the reconstruction comes out in raw units."""
        self.W_enc *= scale
        self.W_dec /= scale
        self.b_dec /= scale

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
        return {
            "architecture": self.saelens_architecture,
            "d_in": cfg.d_in,
            "d_sae": cfg.n_latents,
            "dtype": cfg.dtype,
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "meta": {
                "model_name": cfg.model_name,
                "hook_name": cfg.hook_name,
                "hook_layer": _hook_layer(cfg.hook_name),
                "hook_head_index": None,
            },
        }

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
        """Load an SAE folder written by saelab or by SAELens."""
        path = Path(path)
        cfg_path, weights_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
        if not cfg_path.is_file():
            raise InputError(f"{path} is not an SAE folder: no {CFG_FILENAME} in it")
        if not weights_path.is_file():
            raise InputError(f"{path} has {CFG_FILENAME} but no {WEIGHTS_FILENAME}")
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{cfg_path} is not valid JSON ({e})") from None
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
            fields = {k: v for k, v in ours.items() if k in SAEConfig.model_fields}
            return SAEConfig(**fields)
        arch = _FROM_SAELENS.get(raw.get("architecture", "standard"))
        if arch is None:
            raise InputError(
                f"{where}: SAELens architecture {raw.get('architecture')!r} is not supported "
                f"(supported: {', '.join(_FROM_SAELENS)})"
            )
        meta = raw.get("meta") or {}
        return SAEConfig(
            architecture=arch,  # type: ignore[arg-type]
            d_in=raw["d_in"],
            n_latents=raw["d_sae"],
            k=raw.get("k") if arch == "topk" else None,
            dtype=raw.get("dtype", "float32"),
            hook_name=meta.get("hook_name", raw.get("hook_name")),
            model_name=meta.get("model_name", raw.get("model_name")),
        )
    except ValidationError as e:
        raise InputError(f"{where}: {validation_message(e)}") from None
    except KeyError as e:
        raise InputError(f"{where} lacks the field {e.args[0]!r}") from None


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
