"""Words for features: an automatic label from the top examples, and an optional explainer.

:func:`auto_label` names a feature by what its top examples peak on: the commonest peak
token, or the commonest two-token phrase ending there when that is as consistent. Its
confidence is the share of top examples that agree.

:class:`Explainer` asks a chat model behind any OpenAI-compatible endpoint
(``POST {base_url}/chat/completions``) for a one-line explanation from the top and
quantile-band examples, then scores it with a detection test: shown held-out texts,
some where the feature fires and some where it does not, the model says which fire;
the score is the balanced accuracy (0.5 = chance, 1 = perfect).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from saelab.errors import InputError

Example = tuple[list[str], list[float]]  # token texts, activations


def show_token(text: str) -> str:
    """A token's text made visible: newlines as ⏎, a lone space as ␣."""
    t = text.replace("\n", "⏎").replace("\t", "⇥")
    return t if t.strip() else t.replace(" ", "␣")


def auto_label(examples: Sequence[tuple[list[str], int]]) -> tuple[str, float]:
    """(label, confidence in [0, 1]) from (token texts, peak index) of the top examples."""
    if not examples:
        return "dead", 0.0
    uni = Counter(show_token(toks[p]).strip() or show_token(toks[p]) for toks, p in examples)
    bi = Counter((show_token(toks[p - 1]) if p > 0 else "") + show_token(toks[p]) for toks, p in examples)
    n = len(examples)
    ((tok, c1),) = uni.most_common(1)
    ((phrase, c2),) = bi.most_common(1)
    if c2 >= c1 and c2 >= 2 and phrase.strip() != tok:
        return f"“{phrase.strip()}”", c2 / n
    if c1 / n >= 0.3 or len(uni) == 1:
        return f"“{tok}”", c1 / n
    top = [t for t, _ in uni.most_common(3)]
    return "mixed: " + ", ".join(f"“{t}”" for t in top), c1 / n


def flat(text: str) -> str:
    """One line per example in a prompt: newlines shown as ⏎."""
    return text.replace("\r", "").replace("\n", "⏎")


def marked(tokens: Sequence[str], acts: Sequence[float]) -> str:
    """Text with the tokens where the feature fires wrapped in <<…>>, on one line."""
    return flat("".join(f"<<{t}>>" if a > 0 else t for t, a in zip(tokens, acts, strict=True)))


@dataclass
class Explainer:
    base_url: str
    model: str = "gpt-4o-mini"
    api_key: str | None = None
    timeout: float = 60.0

    def __post_init__(self) -> None:
        self.api_key = (
            self.api_key or os.environ.get("SAELAB_EXPLAINER_KEY") or os.environ.get("OPENAI_API_KEY")
        )
        self._client = httpx.Client(timeout=self.timeout)

    def _chat(self, system: str, user: str) -> str:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        url = self.base_url.rstrip("/") + "/chat/completions"
        try:
            r = self._client.post(
                url,
                headers=headers,
                json={
                    "model": self.model,
                    "temperature": 0,
                    "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
                },
            )
            r.raise_for_status()
            return str(r.json()["choices"][0]["message"]["content"]).strip()
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            raise InputError(f"explainer at {url} failed: {e}") from None

    def explain(self, examples: Sequence[Example]) -> str:
        body = "\n".join(f"{i + 1}. {marked(t, a)}" for i, (t, a) in enumerate(examples))
        reply = self._chat(
            "You interpret features of a sparse autoencoder trained on a language model's "
            "activations. Given texts where the feature fires on the tokens marked <<like this>>, "
            "say in at most 12 words what the feature detects. Reply with the explanation only.",
            f"Examples:\n{body}",
        )
        return reply.splitlines()[0].strip() if reply else ""

    def score(
        self, explanation: str, positives: Sequence[list[str]], negatives: Sequence[list[str]]
    ) -> float | None:
        """Balanced accuracy of the detection test, or None if the reply is unusable."""
        texts = [*positives, *negatives]
        if not positives or not negatives:
            return None
        truth = [1] * len(positives) + [0] * len(negatives)
        # Interleave so position gives nothing away, deterministically.
        order = sorted(range(len(texts)), key=lambda i: (i * 7919) % len(texts))
        body = "\n".join(f"{n + 1}. {flat(''.join(texts[i]))}" for n, i in enumerate(order))
        reply = self._chat(
            "You test an explanation of a sparse-autoencoder feature. For each numbered text, "
            "answer 1 if the feature described would fire somewhere in it, else 0. Reply with a "
            "JSON list of 0s and 1s only, one per text.",
            f"Explanation: {explanation}\n\nTexts:\n{body}",
        )
        m = re.search(r"\[[^\]]*\]", reply)
        try:
            said = json.loads(m.group(0)) if m else None
        except ValueError:
            said = None
        if not isinstance(said, list) or len(said) != len(texts):
            return None
        answers = [0] * len(texts)
        for n, i in enumerate(order):
            answers[i] = 1 if said[n] in (1, "1", True) else 0
        tp = sum(a == 1 for a, t in zip(answers, truth, strict=True) if t == 1) / len(positives)
        tn = sum(a == 0 for a, t in zip(answers, truth, strict=True) if t == 0) / len(negatives)
        return (tp + tn) / 2
