"""SAE folders written by other libraries, read into saelab's own architectures so that every
command (eval, atlas, serve, steer, bench) works on them unchanged.

EleutherAI sparsify (1.x)
    one folder per hookpoint: ``cfg.json`` (``k``, ``num_latents`` or ``expansion_factor``,
    ``d_in``, ``activation``, ``transcode``, ``skip_connection``) and ``sae.safetensors``
    (``encoder.weight`` [n, d], ``encoder.bias`` [n], ``W_dec`` [n, d], ``b_dec`` [d], and
    ``W_skip`` [d, d] with a skip connection). Its forward is TopK(ReLU((x − b_dec) W_encᵀ + b))
    (a transcoder does not centre its input), decoded as z W_dec + b_dec (+ x W_skipᵀ): saelab's
    TopK SAE, or its transcoder. The hookpoint is the folder's name, a module of the model
    (``layers.6`` the residual stream after block 6, ``layers.6.mlp`` the MLP); the model comes
    from the run's ``config.json`` one folder up, when it is there.
dictionary_learning (0.1)
    ``ae.pt`` (a state dict) + ``config.json`` (``{"trainer": {"dict_class", "activation_dim",
    "dict_size", "k", "layer", "lm_name", "submodule_name", ...}}``). ``AutoEncoder`` (standard,
    ReLU), ``AutoEncoderTopK``, ``BatchTopKSAE`` and ``MatryoshkaBatchTopKSAE`` (a threshold at
    inference), ``JumpReluAutoEncoder`` (whose input is not centred by b_dec: the centring is folded
    into b_enc) and ``GatedAutoEncoder``. A standard SAE loads with unit-norm decoder rows, the
    encoder rescaled to match, as the library's own ``from_pretrained`` does.

Anything these readers cannot reproduce exactly (sparsify's ``groupmax`` activation, a skip
connection on a plain SAE) is refused with a line naming the setting.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from saelab.config_base import validation_message
from saelab.errors import InputError
from saelab.sae.base import CFG_FILENAME, SAE, WEIGHTS_FILENAME, create
from saelab.sae.config import SAEConfig

SPARSIFY_WEIGHTS = "sae.safetensors"
DICTLEARN_WEIGHTS = "ae.pt"
DICTLEARN_CFG = "config.json"


def detect(path: Path) -> str | None:
    """Which library wrote the SAE folder ``path``: "saelab" (saelab or SAELens), "sparsify",
    "dictionary_learning", or None."""
    if (path / CFG_FILENAME).is_file() and (path / WEIGHTS_FILENAME).is_file():
        return "saelab"
    if (path / CFG_FILENAME).is_file() and (path / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    if (path / DICTLEARN_WEIGHTS).is_file():
        return "dictionary_learning"
    return None


def weights_file(path: Path) -> Path:
    """The weights file of the SAE folder ``path``, whichever library wrote it (what a finished
    stage's fingerprint names)."""
    kind = detect(path)
    return path / {"sparsify": SPARSIFY_WEIGHTS, "dictionary_learning": DICTLEARN_WEIGHTS}.get(
        kind or "", WEIGHTS_FILENAME)


def load_foreign(path: Path, kind: str) -> SAE:
    """The SAE in a sparsify or dictionary_learning folder, as a saelab SAE."""
    cfg, tensors = (_sparsify if kind == "sparsify" else _dictionary_learning)(path)
    sae = create(cfg)
    sae.load_saelens_tensors(tensors)
    return sae


def describe_missing(path: Path) -> str:
    """Why ``path`` is not an SAE folder, and what would be."""
    below = sorted(p.parent.name for p in path.glob(f"*/{CFG_FILENAME}"))
    if below:
        shown = ", ".join(below[:8]) + (", ..." if len(below) > 8 else "")
        return (f"{path} is not an SAE folder but holds SAE folders (a sparsify run keeps one per "
                f"hookpoint): pass one of them ({shown})")
    return (f"{path} is not an SAE folder: no {CFG_FILENAME} + {WEIGHTS_FILENAME} (saelab, SAELens), "
            f"{CFG_FILENAME} + {SPARSIFY_WEIGHTS} (sparsify) or {DICTLEARN_WEIGHTS} (dictionary_learning) "
            "in it")


def _config(where: Path, **fields: Any) -> SAEConfig:
    try:
        return SAEConfig(**fields)
    except ValidationError as e:
        raise InputError(f"{where}: {validation_message(e)}") from None


def _json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path} holds a JSON {type(raw).__name__}, not an SAE's settings")
    return raw


# ------------------------------------------------------------------------------- sparsify
_HOOKPOINT = re.compile(r"^(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h|layer)\.(\d+)"
                        r"(?:\.(mlp|self_attn|attn|attention))?$")


def sparsify_hooks(hookpoint: str, transcode: bool) -> tuple[str | None, str | None]:
    """(hook read, hook reconstructed if another) of a sparsify hookpoint (a module name: its
    output for an SAE; its input and output for a transcoder); (None, None) if unknown."""
    m = _HOOKPOINT.match(hookpoint)
    if m is None:
        return None, None
    block, part = int(m.group(1)), m.group(2)
    if part is None:
        return ((f"blocks.{block}.hook_resid_pre", f"blocks.{block}.hook_resid_post") if transcode
                else (f"blocks.{block}.hook_resid_post", None))
    if part == "mlp":
        return ((f"blocks.{block}.ln2.hook_normalized", f"blocks.{block}.hook_mlp_out") if transcode
                else (f"blocks.{block}.hook_mlp_out", None))
    return (None, None) if transcode else (f"blocks.{block}.hook_attn_out", None)


def _sparsify(path: Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    raw = _json(path / CFG_FILENAME)
    try:
        w = load_file(str(path / SPARSIFY_WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise InputError(f"cannot read {path / SPARSIFY_WEIGHTS}: {e}") from None
    missing = sorted({"encoder.weight", "encoder.bias", "W_dec", "b_dec"} - set(w))
    if missing:
        raise InputError(f"{path / SPARSIFY_WEIGHTS} lacks {', '.join(missing)} (not a sparsify SAE?)")
    if raw.get("activation", "topk") != "topk":
        raise InputError(f"{path}: sparsify setting activation = {raw['activation']!r} is not "
                         "implemented in saelab (only topk); loading it would give other outputs")
    transcode, skip = bool(raw.get("transcode")), bool(raw.get("skip_connection"))
    if skip and not transcode:
        raise InputError(f"{path}: sparsify setting skip_connection = true without transcode is not "
                         "implemented in saelab; loading it would give other outputs")
    n, d = w["encoder.weight"].shape
    hook, hook_out = sparsify_hooks(path.name, transcode)
    run = path.parent / "config.json"
    model = _json(run).get("model") if run.is_file() else None
    cfg = _config(path, architecture="transcoder" if transcode else "topk", d_in=int(raw.get("d_in", d)),
                  n_latents=int(n), k=int(raw.get("k", 32)), hook_name=hook, model_name=model,
                  **({"hook_name_out": hook_out, "d_out": int(w["b_dec"].shape[0]), "skip": skip}
                     if transcode else {}))
    tensors = {"W_enc": w["encoder.weight"].t(), "b_enc": w["encoder.bias"], "W_dec": w["W_dec"],
               "b_dec": w["b_dec"]}
    if skip:
        tensors["W_skip"] = w["W_skip"].t()  # sparsify adds x @ W_skipᵀ
    return cfg, {k: v.float() for k, v in tensors.items()}


# ------------------------------------------------------------------------ dictionary_learning
_SUBMODULE = (("resid", "hook_resid_post"), ("mlp", "hook_mlp_out"), ("attn", "hook_attn_out"))


def dictionary_learning_hook(trainer: dict[str, Any]) -> str | None:
    """The hook of a dictionary_learning trainer config (``submodule_name`` such as
    ``resid_post_layer_3`` and ``layer``), or None if its name says nothing known."""
    name, layer = str(trainer.get("submodule_name") or ""), trainer.get("layer")
    if not isinstance(layer, int):
        m = re.search(r"(\d+)$", name)
        layer = int(m.group(1)) if m else None
    kind = next((hook for key, hook in _SUBMODULE if key in name), None)
    return f"blocks.{layer}.{kind}" if kind and layer is not None else None


def _dictionary_learning(path: Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    raw = _json(path / DICTLEARN_CFG) if (path / DICTLEARN_CFG).is_file() else {}
    trainer = raw.get("trainer") or {}
    try:
        sd = torch.load(path / DICTLEARN_WEIGHTS, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds
        raise InputError(f"cannot read {path / DICTLEARN_WEIGHTS}: {e}") from None
    if not isinstance(sd, dict):
        raise InputError(f"{path / DICTLEARN_WEIGHTS} holds a {type(sd).__name__}, not a state dict")
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    cls = trainer.get("dict_class") or _guess_class(sd)
    if cls is None:
        raise InputError(f"{path} has {DICTLEARN_WEIGHTS} but no {DICTLEARN_CFG} naming its dict_class "
                         "(AutoEncoderTopK and BatchTopKSAE have the same weights); put the training run's "
                         f"{DICTLEARN_CFG} beside it")
    common = {"hook_name": dictionary_learning_hook(trainer), "model_name": trainer.get("lm_name")}
    try:
        if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
            n, d = sd["encoder.weight"].shape
            arch = "topk" if cls == "AutoEncoderTopK" else "batchtopk"
            cfg = _config(path, architecture=arch, d_in=d, n_latents=n, k=int(sd["k"]), **common)
            t = {"W_enc": sd["encoder.weight"].t(), "b_enc": sd["encoder.bias"],
                 "W_dec": sd["decoder.weight"].t(), "b_dec": sd["b_dec"]}
            if arch == "batchtopk":
                t["threshold"] = sd["threshold"].reshape(()).expand(n)
            return cfg, t
        if cls == "MatryoshkaBatchTopKSAE":
            d, n = sd["W_enc"].shape
            cfg = _config(path, architecture="matryoshka", d_in=d, n_latents=n, k=int(sd["k"]),
                          group_sizes=[int(g) for g in sd["group_sizes"].tolist()], **common)
            return cfg, {"W_enc": sd["W_enc"], "b_enc": sd["b_enc"], "W_dec": sd["W_dec"],
                         "b_dec": sd["b_dec"], "threshold": sd["threshold"].reshape(()).expand(n)}
        if cls == "JumpReluAutoEncoder":
            d, n = sd["W_enc"].shape
            cfg = _config(path, architecture="jumprelu", d_in=d, n_latents=n, **common)
            # its input is not centred: x W + b = (x − b_dec) W + (b + b_dec W)
            b_enc = sd["b_enc"] + sd["b_dec"] @ sd["W_enc"]
            return cfg, {"W_enc": sd["W_enc"], "b_enc": b_enc, "W_dec": sd["W_dec"], "b_dec": sd["b_dec"],
                         "threshold": sd["threshold"]}
        if cls == "GatedAutoEncoder":
            n, d = sd["encoder.weight"].shape
            cfg = _config(path, architecture="gated", d_in=d, n_latents=n, **common)
            return cfg, {"W_enc": sd["encoder.weight"].t(), "b_gate": sd["gate_bias"],
                         "b_mag": sd["mag_bias"], "r_mag": sd["r_mag"], "W_dec": sd["decoder.weight"].t(),
                         "b_dec": sd["decoder_bias"]}
        if cls == "AutoEncoder":
            n, d = sd["encoder.weight"].shape
            cfg = _config(path, architecture="relu", d_in=d, n_latents=n, **common)
            w_dec, w_enc, b_enc = sd["decoder.weight"].t(), sd["encoder.weight"].t(), sd["encoder.bias"]
            norms = w_dec.norm(dim=1)  # unit decoder rows, latents rescaled: as from_pretrained loads it
            return cfg, {"W_enc": w_enc * norms, "b_enc": b_enc * norms, "W_dec": w_dec / norms[:, None],
                         "b_dec": sd["bias"]}
    except KeyError as e:
        raise InputError(f"{path / DICTLEARN_WEIGHTS} lacks {e.args[0]!r}, which a {cls} has") from None
    raise InputError(f"{path}: dictionary_learning class {cls!r} is not supported (supported: AutoEncoder, "
                     "AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE, JumpReluAutoEncoder, "
                     "GatedAutoEncoder)")


def _guess_class(sd: dict[str, Tensor]) -> str | None:
    """The dictionary class of a state dict without its config.json."""
    if "group_sizes" in sd:
        return "MatryoshkaBatchTopKSAE"
    if "gate_bias" in sd:
        return "GatedAutoEncoder"
    if "W_enc" in sd and "threshold" in sd:
        return "JumpReluAutoEncoder"
    if "bias" in sd and "k" not in sd:
        return "AutoEncoder"
    return None  # TopK and BatchTopK: only config.json says which
