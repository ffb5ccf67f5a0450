"""Hook points read the real models' own activations, by TransformerLens names."""

from __future__ import annotations

import pytest
import torch

from saelab.activations.hooks import KINDS, hook_names, hook_width, parse_hook, run_hooked
from saelab.errors import InputError


def _ids(lm, n: int = 24) -> torch.Tensor:
    fmt = lm.window_format()
    body = list(range(1000, 1000 + n))
    row = [fmt.bos_id, *body] + ([fmt.end_id] if fmt.end_id is not None else [])
    return torch.tensor([row, row[:1] + body[::-1] + row[len(body) + 1:]])


def test_minilm_resid_hooks_equal_hidden_states(minilm):
    ids = _ids(minilm)
    names = [f"blocks.{i}.hook_resid_post" for i in range(minilm.n_layers)]
    cap, _ = run_hooked(minilm.model, ids, capture=[*names, "blocks.0.hook_resid_pre"])
    hidden = minilm.model(ids, output_hidden_states=True).hidden_states
    assert torch.equal(cap["blocks.0.hook_resid_pre"], hidden[0])
    for i, name in enumerate(names):
        assert torch.equal(cap[name], hidden[i + 1]), name


def test_minilm_mlp_hooks_compose(minilm):
    """The MLP hidden layer, pushed through the output projection, is the MLP output."""
    ids = _ids(minilm)
    cap, _ = run_hooked(minilm.model, ids, capture=["blocks.2.mlp.hook_post", "blocks.2.hook_mlp_out",
                                                    "blocks.2.hook_attn_out"])
    dense = minilm.model.encoder.layer[2].output.dense
    torch.testing.assert_close(dense(cap["blocks.2.mlp.hook_post"]), cap["blocks.2.hook_mlp_out"])
    width = hook_width(minilm.model, "blocks.2.mlp.hook_post")
    assert cap["blocks.2.mlp.hook_post"].shape[-1] == 1536 == width
    assert hook_width(minilm.model, "blocks.2.hook_attn_out") == 384


@pytest.mark.slow
def test_smollm_hooks_equal_hidden_states_and_add_up(smollm):
    ids = _ids(smollm)
    names = [f"blocks.6.{k}" for k in KINDS]
    cap, out = run_hooked(smollm.model, ids, capture=names)
    assert out is None  # stopped after block 6
    hidden = smollm.model(ids, output_hidden_states=True).hidden_states
    assert torch.equal(cap["blocks.6.hook_resid_pre"], hidden[6])
    assert torch.equal(cap["blocks.6.hook_resid_post"], hidden[7])
    # Llama blocks are sequential: resid_post = resid_pre + attn_out + mlp_out.
    total = cap["blocks.6.hook_resid_pre"] + cap["blocks.6.hook_attn_out"] + cap["blocks.6.hook_mlp_out"]
    torch.testing.assert_close(total, hidden[7])
    down = smollm.model.model.layers[6].mlp.down_proj
    torch.testing.assert_close(down(cap["blocks.6.mlp.hook_post"]), cap["blocks.6.hook_mlp_out"])
    assert hook_width(smollm.model, "blocks.6.mlp.hook_post") == 1536


def test_replacing_a_hook_changes_the_rest_of_the_pass(minilm):
    ids = _ids(minilm)
    clean = minilm.model(ids).last_hidden_state
    _, same = run_hooked(minilm.model, ids, replace={"blocks.3.hook_resid_post": lambda x: x},
                         need_output=True)
    assert torch.equal(same.last_hidden_state, clean)
    _, zeroed = run_hooked(minilm.model, ids, replace={"blocks.3.hook_resid_post": torch.zeros_like},
                           need_output=True)
    assert not torch.allclose(zeroed.last_hidden_state, clean)
    # hooks are removed afterwards
    assert torch.equal(minilm.model(ids).last_hidden_state, clean)


def test_bad_hook_names_list_the_valid_ones(minilm):
    assert len(hook_names(minilm.model)) == 6 * len(KINDS)
    assert parse_hook(minilm.model, "blocks.5.mlp.hook_post") == (5, "mlp.hook_post")
    for bad in ("blocks.6.hook_resid_post", "blocks.1.hook_resid", "resid_post", "blocks.x.hook_mlp_out"):
        with pytest.raises(InputError, match=r"blocks 0-5 .*hook_resid_pre, hook_resid_post"):
            parse_hook(minilm.model, bad)
