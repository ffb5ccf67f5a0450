"""Transcoders and skip-transcoders: a sparse coder that reads one hook point and reconstructs
another, trained on row-aligned pairs, spliced into the model in place of its MLP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, run_cli, write_corpus
from safetensors.torch import load_file

from saelab import SAE, SAEConfig, SaelabError, create, train_sae
from saelab.activations.harvest import harvest
from saelab.activations.source import MatrixSource, PairedSource, open_pairs
from saelab.config import HarvestConfig, TextConfig
from saelab.data.toy import ToyDataConfig, make_toy_data
from saelab.errors import InputError
from saelab.eval.metrics import evaluate_reconstruction
from saelab.eval.splice import splice_eval
from saelab.sae.base import TrainContext

D_IN, D_OUT, N, K = 16, 24, 48, 4


@pytest.fixture(scope="module")
def pairs():
    """x = c F_in, y = c F_out + x A: the same sparse codes c seen through two maps, y with a
    linear part (what a skip connection can carry)."""
    data = make_toy_data(ToyDataConfig(d_in=D_IN, n_features=40, avg_active=3, seed=3))
    g = torch.Generator().manual_seed(9)
    f_out = torch.randn(40, D_OUT, generator=g)
    f_out /= f_out.norm(dim=1, keepdim=True)
    a = torch.linalg.qr(torch.randn(D_OUT, D_OUT, generator=g))[0][:D_IN]  # orthonormal rows

    def make(rows: int, seed: int):
        x, c = data.sample(rows, seed)
        return x * 3.0, (c @ f_out + 0.5 * x @ a) * 0.2 + 0.05  # other scales, an offset
    return make(40_000, 1), make(5_000, 2)


def make(skip: bool = False) -> SAE:
    torch.manual_seed(0)
    sae = create(SAEConfig(architecture="transcoder", d_in=D_IN, d_out=D_OUT, n_latents=N, k=K, skip=skip))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return sae


@pytest.mark.parametrize("skip", [False, True])
def test_shapes_and_no_input_centring(skip: bool) -> None:
    sae = make(skip)
    assert sae.W_enc.shape == (D_IN, N) and sae.W_dec.shape == (N, D_OUT) and sae.b_dec.shape == (D_OUT,)
    assert hasattr(sae, "W_skip") == skip
    x = torch.randn(7, 3, D_IN)
    z = sae.encode(x)
    assert z.shape == (7, 3, N) and ((z != 0).sum(-1) <= K).all()
    out = sae(x)
    assert out.shape == (7, 3, D_OUT)
    expected = sae.decode(z) + (x @ sae.W_skip if skip else 0)
    assert torch.allclose(out, expected, atol=1e-5)
    # the input is not centred by b_dec: the pre-activations are x W_enc + b_enc
    assert torch.allclose(sae.pre_activations(x), x @ sae.W_enc + sae.b_enc, atol=1e-6)


@pytest.mark.parametrize("skip", [False, True])
def test_loss_is_the_target_reconstruction_and_gradients_reach_every_parameter(skip: bool) -> None:
    sae = make(skip)
    x, y = torch.randn(64, D_IN), torch.randn(64, D_OUT)
    out = sae.training_forward(x, TrainContext(dead_mask=torch.rand(N) < 0.5), target=y)
    assert torch.allclose(out.recon, sae(x), atol=1e-5)
    with torch.no_grad():
        expected = float((y - sae(x)).pow(2).sum(-1).mean())
    assert float(out.terms["mse"]) == pytest.approx(expected, rel=1e-5)
    assert float(out.l0) <= K
    out.loss.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_trained_transcoder_reconstructs_the_target_and_the_skip_helps(pairs) -> None:
    (x, y), (hx, hy) = pairs
    fvu = {}
    for skip in (False, True):
        sae = train_sae(PairedSource(MatrixSource(x), MatrixSource(y)), architecture="transcoder", skip=skip,
                        n_latents=96, k=3, tokens=200_000, batch_size=512, progress=False)
        m = evaluate_reconstruction(sae, PairedSource(MatrixSource(hx), MatrixSource(hy)).rows(5000))
        fvu[skip] = m.fvu  # on raw (unscaled) rows: the input and target scales were folded in
        assert m.l0 <= 3
        assert sae.cfg.activation_norm_scale != pytest.approx(sae.cfg.target_norm_scale)
    assert fvu[False] < 0.35, fvu
    assert fvu[True] < 0.85 * fvu[False], fvu  # the linear part goes through the skip


def test_save_load_round_trip(tmp_path) -> None:
    sae = make(skip=True)
    sae.cfg = sae.cfg.model_copy(update={"hook_name": "blocks.2.ln2.hook_normalized",
                                         "hook_name_out": "blocks.2.hook_mlp_out"})
    sae.save(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "cfg.json").read_text())
    assert cfg["d_in"] == D_IN and cfg["d_out"] == D_OUT and cfg["d_sae"] == N and cfg["k"] == K
    assert cfg["apply_b_dec_to_input"] is False
    assert cfg["meta"]["hook_name_out"] == "blocks.2.hook_mlp_out"
    assert cfg["saelab"]["sae"]["architecture"] == "transcoder" and cfg["saelab"]["sae"]["skip"] is True
    assert load_file(tmp_path / "t" / "sae_weights.safetensors")["W_skip"].shape == (D_IN, D_OUT)
    loaded = SAE.load(tmp_path / "t")
    x = torch.randn(9, D_IN)
    assert torch.allclose(loaded(x), sae(x), atol=1e-6)
    assert loaded.cfg.hook_name_out == "blocks.2.hook_mlp_out"


def test_pairs_are_required_and_checked(pairs) -> None:
    (x, y), _ = pairs
    with pytest.raises(InputError, match="reads \\(input, target\\) pairs"):
        train_sae(x, architecture="transcoder", n_latents=32, k=2, tokens=1024, progress=False)
    with pytest.raises(InputError, match="reconstructs its input; target activations are for transcoder"):
        train_sae(PairedSource(MatrixSource(x), MatrixSource(y)), architecture="topk", n_latents=32, k=2,
                  tokens=1024, progress=False)
    with pytest.raises(InputError, match="row-aligned"):
        PairedSource(MatrixSource(x), MatrixSource(y[:100]))


@pytest.mark.slow
def test_harvested_pairs_train_a_transcoder_that_splices_in_place_of_the_mlp(smollm, tmp_path) -> None:
    corpus = write_corpus(tmp_path / "corpus", n_docs=40, words=150)
    hooks = ["blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out"]
    cfg = HarvestConfig(model="smollm2-135m", hooks=hooks, corpus=str(corpus), context_length=64,
                        tokens=40_000, shard_rows=16_384, progress=False, heldout_fraction=0.2)
    harvest(cfg, tmp_path / "store", lm=smollm)
    for h in hooks:  # the pairing is written down
        manifest = json.loads((tmp_path / "store" / h / "manifest.json").read_text())
        assert manifest["aligned_hooks"] == hooks
    src = open_pairs(tmp_path / "store" / hooks[0], tmp_path / "store" / hooks[1])
    x, y = next(src.batches(256, seed=0))
    # the rows are the same tokens: the MLP output of each input row, recomputed, matches
    mlp = smollm.model.model.layers[2].mlp
    with torch.no_grad():
        assert torch.allclose(mlp(x), y, atol=0.02 * float(y.abs().max()))
    out = tmp_path / "tc"
    proc = run_cli("train", "--acts", str(tmp_path / "store" / hooks[0]), "--target-acts",
                   str(tmp_path / "store" / hooks[1]), "--arch", "transcoder", "--skip",
                   "--n-latents", "1152", "--k", "16", "--tokens", "80000", "--batch-size", "512",
                   "--lr", "2e-3", "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    tc = SAE.load(out)
    assert tc.cfg.hook_name == hooks[0] and tc.cfg.hook_name_out == hooks[1]
    assert tc.cfg.model_name == "smollm2-135m"
    text = TextConfig(corpus=str(corpus), context_length=64, heldout_fraction=0.2)
    r = splice_eval(tc, smollm, text, tokens=1024, progress=False)
    assert r.hook_name == hooks[0]
    assert r.fvu < 0.6, r.fvu  # of the MLP output
    assert r.ce_clean < r.ce_spliced < r.ce_zero_sae_positions
    assert r.ce_recovered > 0.5, r.ce_recovered
    # steering a transcoder feature moves the MLP output by exactly what the feature writes
    from saelab.activations.hooks import replaced, run_hooked
    from saelab.steer import Edit
    from saelab.steer.steering import steering_hooks

    ids = torch.tensor([[1, *smollm.tokenizer("def add(x, y):\n    return x + y")["input_ids"]]])
    with torch.no_grad():
        clean, _ = run_hooked(smollm.model, ids, capture=hooks)
        z = tc.encode(clean[hooks[0]][0, 1:])
        f = int(z.sum(0).argmax())
        with replaced(smollm.model, steering_hooks(tc, hooks[0], [Edit(f, "clamp", 5.0)])):
            steered, _ = run_hooked(smollm.model, ids, capture=[hooks[1]])
    delta = steered[hooks[1]][0] - clean[hooks[1]][0]
    assert float(delta[0].abs().max()) == 0  # BOS untouched
    assert torch.allclose(delta[1:], (5.0 - z[:, f])[:, None] * tc.W_dec[f], atol=1e-4)
    # its atlas: features read at the MLP's input, logit effects of what they write at its output
    from saelab.activations.hooks import unembedding
    from saelab.analyse.atlas import build_atlas
    from saelab.analyse.atlasdb import Atlas
    from saelab.config import AtlasConfig

    acfg = AtlasConfig(corpus=str(corpus), context_length=64, heldout_fraction=0.2, tokens=3000,
                       eval_tokens=256, progress=False)
    atlas = Atlas(build_atlas(out, acfg, tmp_path / "tc.atlas", lm=smollm).path)
    page = atlas.page(f)
    assert page.count > 0 and page.top
    w_u, scale = unembedding(smollm.model)
    logits = (tc.W_dec[f].detach() * scale) @ w_u.T
    assert [i for i, _ in page.logits.pos] == logits.topk(10).indices.tolist()
    # a transcoder that writes nothing is the zero ablation of the MLP output, exactly
    zero = create(tc.cfg)
    with torch.no_grad():
        for p in zero.parameters():
            p.zero_()
    rz = splice_eval(zero, smollm, text, tokens=1024, progress=False)
    assert rz.ce_spliced == pytest.approx(rz.ce_zero_sae_positions, abs=1e-9)
    assert rz.ce_recovered_sae_positions == pytest.approx(0, abs=1e-9)
    # eval --acts on the pairs, and its one-line error without the targets
    proc = run_cli("eval", str(out), "--acts", str(tmp_path / "store" / hooks[0]), "--target-acts",
                   str(tmp_path / "store" / hooks[1]), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["fvu"] < 0.6
    assert_one_line_error(run_cli("eval", str(out), "--acts", str(tmp_path / "store" / hooks[0])),
                          "is a transcoder: give --target-acts")


def test_stores_from_two_harvests_are_not_pairs(tmp_path) -> None:
    from saelab.activations.store import StoreWriter, open_store

    for name, hook in (("a", "blocks.0.ln2.hook_normalized"), ("b", "blocks.0.hook_mlp_out")):
        w = StoreWriter(tmp_path / name, {"model": "m", "hook_name": hook, "d_in": 4,
                                          "aligned_hooks": [hook]}, dtype="float32")
        w.write_shard(torch.randn(100, 4), windows_end=1)
        w.finish()
    with pytest.raises(InputError, match="not harvested together"):
        PairedSource(open_store(tmp_path / "a"), open_store(tmp_path / "b"))
    np.save(tmp_path / "x.npy", np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(SaelabError):
        open_pairs(tmp_path / "x.npy", tmp_path / "a")
