"""Hook points in a Hugging Face model, named as TransformerLens names them.

``blocks.{i}.hook_resid_pre``   residual stream entering block i
``blocks.{i}.hook_resid_post``  residual stream leaving block i
``blocks.{i}.hook_attn_out``    attention output (before it is added to the residual)
``blocks.{i}.ln2.hook_normalized``  MLP input: the residual after the pre-MLP norm (a
                                transcoder reads it and reconstructs ``hook_mlp_out``)
``blocks.{i}.hook_mlp_out``     MLP output (before it is added to the residual)
``blocks.{i}.mlp.hook_post``    MLP hidden activations after the nonlinearity (for gated
                                MLPs act(gate) * up, the input of the down projection)

Each name maps onto a module of the Gemma, Llama, GPT-2, GPT-NeoX or BERT module tree and to
either that module's input or its output. :func:`run_hooked` runs a forward pass that
captures any set of hook points, optionally replaces some of them, and stops as soon as
every captured point has been seen when the rest of the model is not needed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from saelab.errors import InputError

KINDS = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "ln2.hook_normalized", "hook_mlp_out",
         "mlp.hook_post")
_NAME = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in KINDS) + r")$")


@dataclass(frozen=True)
class Family:
    """Where the blocks live and which submodule of a block each hook kind reads."""

    name: str
    blocks: tuple[str, ...]  # candidate attribute paths to the list of blocks
    # kind -> (submodule path inside the block ('' = the block), "in" or "out")
    points: dict[str, tuple[str, str]]
    final_norm: tuple[str, ...] = ()  # candidate paths to the norm before the unembedding
    norm_offset: float = 0.0  # the norms scale by offset + weight (Gemma's RMSNorm: 1 + weight)


_RESID = {"hook_resid_pre": ("", "in"), "hook_resid_post": ("", "out")}
FAMILIES = (
    # Gemma 2/3 norm the attention and MLP outputs before adding them to the residual stream: the
    # hook points are those norms' outputs, so that resid_post = resid_pre + attn_out + mlp_out. Its
    # embedding scale (sqrt(d_model)) is inside the embedding module, so inside block 0's resid_pre.
    # Listed before Llama, whose module names it shares.
    Family("gemma", ("model.layers", "layers"), {
        **_RESID, "hook_attn_out": ("post_attention_layernorm", "out"), "ln2.hook_normalized": ("mlp", "in"),
        "hook_mlp_out": ("post_feedforward_layernorm", "out"), "mlp.hook_post": ("mlp.down_proj", "in")},
        ("model.norm", "norm"), norm_offset=1.0),
    Family("llama", ("model.layers", "layers"), {
        **_RESID, "hook_attn_out": ("self_attn.o_proj", "out"), "ln2.hook_normalized": ("mlp", "in"),
        "hook_mlp_out": ("mlp", "out"), "mlp.hook_post": ("mlp.down_proj", "in")}, ("model.norm", "norm")),
    Family("gpt2", ("transformer.h", "h"), {
        **_RESID, "hook_attn_out": ("attn.c_proj", "out"), "ln2.hook_normalized": ("mlp", "in"),
        "hook_mlp_out": ("mlp", "out"), "mlp.hook_post": ("mlp.c_proj", "in")}, ("transformer.ln_f", "ln_f")),
    Family("gpt_neox", ("gpt_neox.layers", "layers"), {
        **_RESID, "hook_attn_out": ("attention.dense", "out"), "ln2.hook_normalized": ("mlp", "in"),
        "hook_mlp_out": ("mlp", "out"), "mlp.hook_post": ("mlp.dense_4h_to_h", "in")},
        ("gpt_neox.final_layer_norm", "final_layer_norm")),
    Family("bert", ("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer"), {
        **_RESID, "hook_attn_out": ("attention.output.dense", "out"),
        "ln2.hook_normalized": ("intermediate", "in"), "hook_mlp_out": ("output.dense", "out"),
        "mlp.hook_post": ("intermediate", "out")}),
)


def _get(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split(".") if path else []:
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _blocks(model: nn.Module) -> tuple[Family, nn.ModuleList]:
    for fam in FAMILIES:
        for path in fam.blocks:
            try:
                blocks = _get(model, path)
            except (AttributeError, IndexError):
                continue
            if isinstance(blocks, nn.ModuleList) and len(blocks):
                try:
                    for sub, _ in fam.points.values():
                        _get(blocks[0], sub)
                except AttributeError:
                    continue
                return fam, blocks
    raise InputError(
        f"{type(model).__name__}: no hook points known for this architecture (saelab knows the "
        f"Gemma, Llama, GPT-2, GPT-NeoX and BERT module trees)"
    )


def unembedding(model: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """(W_U [vocab, d_model], the final norm's scale [d_model] or None) of a model with an LM
    head, else None. A direction d's effect on the logits is taken as W_U @ (scale * d): the
    final norm's per-feature scale applies, its data-dependent division does not."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        return None
    fam, _ = _blocks(model)
    for path in fam.final_norm:
        try:
            norm = _get(model, path)
        except AttributeError:
            continue
        w = getattr(norm, "weight", None)
        return head.weight.detach(), None if w is None else w.detach() + fam.norm_offset
    return head.weight.detach(), None


def hook_names(model: nn.Module) -> list[str]:
    """Every valid hook name of a model, block by block."""
    _, blocks = _blocks(model)
    return [f"blocks.{i}.{k}" for i in range(len(blocks)) for k in KINDS]


def parse_hook(model: nn.Module, name: str) -> tuple[int, str]:
    """(block index, kind) of a hook name, or an error that lists the valid names."""
    _, blocks = _blocks(model)
    m = _NAME.match(name)
    if m is None or int(m.group(1)) >= len(blocks):
        raise InputError(
            f"unknown hook point {name!r}; this model has blocks 0-{len(blocks) - 1} and hook points "
            f"blocks.N.{{{', '.join(KINDS)}}}, e.g. blocks.{min(6, len(blocks) - 1)}.hook_resid_post"
        )
    return int(m.group(1)), m.group(2)


def _module_for(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    block, kind = parse_hook(model, name)
    fam, blocks = _blocks(model)
    sub, side = fam.points[kind]
    return _get(blocks[block], sub), side


def hook_width(model: nn.Module, name: str) -> int:
    """The width of the activations at a hook point."""
    module, side = _module_for(model, name)
    if side == "in":
        w = getattr(module, "weight", None)
        if isinstance(module, nn.Linear):
            return int(module.in_features)
        if w is not None:  # GPT-2 Conv1D stores [in, out]
            return int(w.shape[0])
        for child in module.modules():  # a block's input: its first projection's input
            if isinstance(child, nn.Linear):
                return int(child.in_features)
            if type(child).__name__ == "Conv1D":
                return int(child.weight.shape[0])
    for child in reversed(list(module.modules())):
        if isinstance(child, nn.Linear):
            return int(child.out_features)
        w = getattr(child, "weight", None)
        if w is not None and type(child).__name__ == "Conv1D":
            return int(w.shape[1])
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0))


def residual_directions(model: nn.Module, name: str, dirs: Tensor) -> Tensor:
    """Directions at a hook point [n, width] as the directions they write into the residual
    stream [n, d_model]: through the MLP's down projection for ``mlp.hook_post`` (a neuron's
    output weights), unchanged for the hook points that already live in the residual."""
    _, kind = parse_hook(model, name)
    if kind != "mlp.hook_post":
        return dirs
    module, _ = _module_for(model, name)
    w = module.weight.detach().float().to(dirs.device)
    # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out]; BERT's intermediate is an
    # up projection whose output the next module reads, so only the first two apply.
    if isinstance(module, nn.Linear):
        return dirs @ w.T
    if type(module).__name__ == "Conv1D":
        return dirs @ w
    raise InputError(f"{name}: cannot map directions at this hook into the residual stream")


class _Stop(Exception):
    """Raised inside a hook once nothing later in the forward pass is needed."""


Replace = Callable[[Tensor], Tensor]


@contextmanager
def _hooks(model: nn.Module, capture: list[str], replace: dict[str, Replace],
           stop_early: bool) -> Iterator[dict[str, Tensor]]:
    captured: dict[str, Tensor] = {}
    handles = []
    wanted = set(capture)

    def on_value(name: str, value: Tensor) -> Tensor:
        if name in replace:
            value = replace[name](value)
        if name in wanted:
            captured[name] = value.detach()
            if stop_early and len(captured) == len(wanted):
                raise _Stop
        return value

    for name in dict.fromkeys([*capture, *replace]):
        module, side = _module_for(model, name)
        if side == "in":
            def pre(mod: nn.Module, args: tuple, kwargs: dict, name: str = name) -> Any:
                if args:
                    return (on_value(name, args[0]), *args[1:]), kwargs
                key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
                return args, {**kwargs, key: on_value(name, kwargs[key])}
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(mod: nn.Module, args: tuple, output: Any, name: str = name) -> Any:
                if isinstance(output, tuple):
                    return (on_value(name, output[0]), *output[1:])
                return on_value(name, output)
            handles.append(module.register_forward_hook(post))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@contextmanager
def replaced(model: nn.Module, replace: dict[str, Replace]) -> Iterator[None]:
    """While inside, every forward pass of ``model`` (generation included) passes the values
    at each hook point through its function in ``replace``."""
    with _hooks(model, [], replace, stop_early=False):
        yield


@torch.no_grad()
def run_hooked(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
               capture: list[str] | tuple[str, ...] = (), replace: dict[str, Replace] | None = None,
               need_output: bool = False) -> tuple[dict[str, Tensor], Any]:
    """One forward pass. Returns (captured activations by hook name, model output or None).

    Without ``need_output`` the pass stops right after the last captured hook point, so
    harvesting an early layer costs only the blocks up to it.
    """
    capture = list(capture)
    replace = replace or {}
    output = None
    stop_early = not need_output and bool(capture)
    with _hooks(model, capture, replace, stop_early) as captured, suppress(_Stop):
        output = model(input_ids=input_ids, attention_mask=attention_mask)
    missing = [n for n in capture if n not in captured]
    if missing:
        raise InputError(f"hook point(s) {', '.join(missing)} never ran in this model's forward pass")
    return captured, output
