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


def _tiny(family: str) -> torch.nn.Module:
    """A small random model of each causal family saelab hooks, built from transformers' own
    classes (the module trees of the real checkpoints)."""
    import transformers as tf

    common = {"vocab_size": 97, "num_hidden_layers": 2, "num_attention_heads": 2}
    cfgs = {
        "llama": tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=1, **common),
        "gemma3": tf.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=1,
                                      head_dim=16, sliding_window=4, **common),
        "gpt2": tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=97),
        "gpt_neox": tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, **common),
    }
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfgs[family]).eval()
    with torch.no_grad():  # Gemma's norms start at zero (scale 1 + w): make every one count
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "gpt_neox"])
def test_each_family_adds_attn_out_and_mlp_out_to_the_residual(family):
    """resid_post − resid_pre = attn_out + mlp_out in every block of every causal family, Gemma's
    post-attention and post-MLP norms included; block 0's resid_pre is what the embedding module
    gives (with Gemma's sqrt(d_model) scale). BERT is post-norm: its blocks norm the sum, so the
    identity does not hold there by design."""
    model = _tiny(family)
    ids = torch.tensor([[1, 5, 9, 33, 2, 7, 60, 11, 4, 8]])
    names = [f"blocks.{i}.{k}" for i in range(2) for k in KINDS]
    with torch.no_grad():
        cap, _ = run_hooked(model, ids, capture=names)
        hidden = model(ids, output_hidden_states=True).hidden_states
        embedded = model.get_input_embeddings()(ids)
    for i in range(2):
        pre, post = cap[f"blocks.{i}.hook_resid_pre"], cap[f"blocks.{i}.hook_resid_post"]
        added = cap[f"blocks.{i}.hook_attn_out"] + cap[f"blocks.{i}.hook_mlp_out"]
        torch.testing.assert_close(post - pre, added, atol=1e-6, rtol=1e-5)
        assert added.abs().max() > 1e-2  # 10,000 times the tolerance: not a vacuous identity
    if family != "gpt2":  # GPT-2 adds position embeddings after its embedding module
        torch.testing.assert_close(cap["blocks.0.hook_resid_pre"], embedded)
    torch.testing.assert_close(cap["blocks.0.hook_resid_pre"], hidden[0])
    if family == "gemma3":
        raw = model.model.embed_tokens.weight[ids]
        torch.testing.assert_close(cap["blocks.0.hook_resid_pre"], raw * 32**0.5)
        norm = model.model.layers[0].post_feedforward_layernorm
        assert cap["blocks.0.hook_mlp_out"].shape[-1] == hook_width(model, "blocks.0.hook_mlp_out") == 32
        assert not torch.allclose(cap["blocks.0.hook_mlp_out"], norm.weight * 0)  # the normed output
