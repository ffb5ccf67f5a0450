"""Models load by alias, local folder or GGUF file, and the hook map fits every family
saelab knows (GPT-2 and GPT-NeoX checked on small random models saved to disk)."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from saelab.activations.hooks import KINDS, run_hooked
from saelab.errors import InputError
from saelab.models import load_model, resolve_alias


def test_local_folder_loads_like_the_alias(minilm):
    folder, gguf = resolve_alias("minilm-l6")
    assert gguf is None
    lm = load_model(folder)
    assert (lm.d_model, lm.n_layers, lm.causal) == (384, 6, False)
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    assert torch.equal(lm.model(ids).last_hidden_state, minilm.model(ids).last_hidden_state)


@pytest.mark.slow
def test_gguf_file_path_loads(smollm):
    folder, gguf = resolve_alias("smollm2-135m")
    lm = load_model(folder / gguf)  # converted once, then read from the cache
    assert (lm.d_model, lm.n_layers, lm.causal, lm.model_type) == (576, 30, True, "llama")
    ids = torch.tensor([[1, 504, 3458, 314]])
    assert torch.equal(lm.model(ids).logits, smollm.model(ids).logits)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_other_families_hook_correctly(tmp_path, family):
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    else:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=64,
                                                 max_position_embeddings=64))
    model.save_pretrained(tmp_path)
    folder, _ = resolve_alias("minilm-l6")  # any tokenizer will do for hooking
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(folder / f, tmp_path / f)
    lm = load_model(tmp_path)
    assert lm.causal and lm.n_layers == 2 and lm.d_model == 32
    ids = torch.randint(1000, 2000, (2, 10))
    names = [f"blocks.0.{k}" for k in KINDS]
    cap, out = run_hooked(lm.model, ids, capture=names)
    assert out is None
    hidden = lm.model(ids, output_hidden_states=True).hidden_states
    assert torch.equal(cap["blocks.0.hook_resid_pre"], hidden[0])
    assert torch.equal(cap["blocks.0.hook_resid_post"], hidden[1])
    # sequential (GPT-2) and parallel (NeoX) residuals both add attention and MLP outputs
    total = cap["blocks.0.hook_resid_pre"] + cap["blocks.0.hook_attn_out"] + cap["blocks.0.hook_mlp_out"]
    torch.testing.assert_close(total, hidden[1])
    assert cap["blocks.0.mlp.hook_post"].shape[-1] == (128 if family == "gpt2" else 64)


def test_bad_model_names(tmp_path):
    with pytest.raises(InputError, match="no such model file or folder"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(InputError, match="no model weights found"):
        load_model(tmp_path)
