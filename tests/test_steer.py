"""Steering SmolLM2 with a really trained SAE: no edit is exact, clamping a feature raises the
tokens its decoder direction promotes, ablating it lowers them; generation with the KV cache;
attribution; the CLI."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_one_line_error, run_cli

from saelab.activations.hooks import replaced, run_hooked
from saelab.config import TextConfig
from saelab.data.text import text_batches
from saelab.steer import Edit, attribute, generate, next_token_logprobs, steering_fn

pytestmark = pytest.mark.slow
HOOK = "blocks.3.hook_resid_post"


@pytest.fixture(scope="module")
def windows(smollm) -> torch.Tensor:
    text = TextConfig(corpus="python-stdlib", context_length=64, batch_size=8)
    return next(iter(text_batches(smollm, text, "heldout"))).input_ids


def test_no_edit_and_a_null_edit_are_exact(smollm, trained_sae, windows):
    sae, _ = trained_sae
    with torch.no_grad():
        clean = torch.log_softmax(smollm.model(input_ids=windows).logits.double(), dim=-1)
    assert torch.equal(next_token_logprobs(smollm, sae, HOOK, windows, []), clean)
    # scaling a feature by 1 changes nothing either: only the latents' change is decoded
    assert torch.equal(next_token_logprobs(smollm, sae, HOOK, windows, [Edit(5, "scale", 1.0)]), clean)


def _latents(smollm, sae, ids: torch.Tensor) -> torch.Tensor:
    cap, _ = run_hooked(smollm.model, ids, capture=[HOOK])
    return sae.encode(cap[HOOK][:, 1:].float()).detach()


def test_clamping_raises_and_ablating_lowers_the_promoted_tokens(smollm, trained_sae, windows):
    """A feature's logit effect, measured on half of the windows: the tokens whose probability
    loses most (in probability) where it fires when it is ablated. On the other half, ablating the feature
    lowers those tokens where it fires, and clamping it to its peak activation everywhere raises
    them."""
    sae, _ = trained_sae
    fit, test = windows[:4], windows[4:]
    z_fit = _latents(smollm, sae, fit)
    clean_fit = next_token_logprobs(smollm, sae, HOOK, fit)[:, 1:]
    best = None
    for f in torch.argsort((z_fit > 0).sum((0, 1)), descending=True)[:8].tolist():
        where = z_fit[..., f] > 0
        ablated = next_token_logprobs(smollm, sae, HOOK, fit, [Edit(f, "ablate")])[:, 1:]
        drop = (clean_fit.exp() - ablated.exp())[where]  # probability it takes away
        top = drop.mean(0).topk(5)
        if best is None or float(top.values.mean()) > best[0]:
            best = (float(top.values.mean()), f, top.indices, float(z_fit[..., f].max()))
    _, f, tokens, peak = best

    def promoted(edits):
        return next_token_logprobs(smollm, sae, HOOK, test, edits)[:, 1:, tokens].exp().sum(-1)

    fired = _latents(smollm, sae, test)[..., f] > 0
    clean = promoted([])
    clamped = promoted([Edit(f, "clamp", peak)])
    ablated = promoted([Edit(f, "ablate")])
    assert fired.sum() >= 5
    # clamped everywhere: the promoted tokens gain probability over all positions
    assert clamped.mean() > 1.5 * clean.mean(), (f, float(clean.mean()), float(clamped.mean()))
    # ablated: they lose probability where the feature fired
    assert ablated[fired].mean() < clean[fired].mean(), (
        f,
        float(clean[fired].mean()),
        float(ablated[fired].mean()),
    )


def test_generation_with_the_kv_cache(smollm, trained_sae):
    sae, _ = trained_sae
    prompt = "def parse(text):\n    "
    same = generate(smollm, sae, HOOK, prompt, [], max_new_tokens=12)
    assert same.clean == same.steered and len(same.clean) > 0
    # the KV-cached steered generation equals a greedy loop that re-runs the full sequence
    edit = [Edit(7, "add", 40.0)]
    steered = generate(smollm, sae, HOOK, prompt, edit, max_new_tokens=8).steered
    fmt = smollm.window_format()
    ids = torch.tensor([[fmt.bos_id, *smollm.tokenizer(prompt, add_special_tokens=False)["input_ids"]]])
    for _ in range(8):
        nxt = next_token_logprobs(smollm, sae, HOOK, ids, edit)[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    n = 1 + len(smollm.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert smollm.tokenizer.decode(ids[0, n:], skip_special_tokens=True) == steered


def test_attribution_explains_the_logit(smollm, trained_sae):
    sae, _ = trained_sae
    text = "import os\nimport sys\nimport"
    a = attribute(smollm, sae, HOOK, text)
    fmt = smollm.window_format()
    ids = torch.tensor([[fmt.bos_id, *smollm.tokenizer(text, add_special_tokens=False)["input_ids"]]])
    clean = next_token_logprobs(smollm, sae, HOOK, ids)[0, -1]
    assert len(a.tokens) == len(a.per_token) == ids.shape[1] - 1 and a.top
    assert a.target_id == int(clean.argmax())  # default target: the model's own prediction
    # the features with the largest attribution move the target's logit the way it says when
    # they are ablated (activation x gradient is the first-order change)
    for f, v in a.top[:3]:
        with torch.no_grad(), replaced(smollm.model, {HOOK: steering_fn(sae, [Edit(f, "ablate")])}):
            logit = float(smollm.model(input_ids=ids).logits[0, -1, a.target_id])
        assert (logit - a.logit) * v < 0, (f, v, logit, a.logit)


def test_steer_cli(trained_sae):
    _, path = trained_sae
    proc = run_cli(
        "steer",
        "--sae",
        str(path),
        "--feature",
        "7",
        "--add",
        "40",
        "--prompt",
        "The answer is",
        "--max-new-tokens",
        "8",
    )
    assert proc.returncode == 0, proc.stderr
    head = proc.stdout.splitlines()[2]
    assert "unsteered" in head and "steered (add #7 + 40 x direction)" in head
    assert_one_line_error(
        run_cli("steer", "--sae", str(path), "--feature", "7", "--prompt", "x"), "--clamp V"
    )
    assert_one_line_error(
        run_cli("steer", "--sae", str(path), "--feature", "99999", "--ablate", "--prompt", "x"),
        "feature 99999",
        "0 to 2303",
    )
