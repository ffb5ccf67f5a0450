"""The atlas's data contract: what a feature page and the atlas's meta hold, defined once.

The builder (:mod:`saelab.analyse.atlas`) makes a :class:`FeaturePage` per feature and an
:class:`AtlasMeta`; :class:`~saelab.analyse.atlasdb.Atlas` reads them back as these types;
the viewer gets their JSON schema from ``GET /api/schema`` (and the static export from
``data/schema.js``) and checks each page it shows against it, so a page that lacks a field
the viewer needs is reported by name instead of drawing a broken page. The field names are
short where they repeat thousands of times in a file (``t``, ``a`` of an example).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Example(_Model):
    """One context around a firing of the feature."""

    act: float = Field(description="The feature's activation at the peak token.")
    peak: int = Field(ge=0, description="Index in t of the token the example is about.")
    t: list[int] = Field(description="Token ids of the context.")
    a: list[float] = Field(description="The feature's activation on each token of t.")


class Band(_Model):
    """Examples from one activation quantile band of a uniform sample of firings."""

    band: int = Field(ge=0, description="Band number, weakest first.")
    q: tuple[float, float] = Field(description="The band's quantile range, [from, to].")
    lo: float = Field(description="Weakest activation among the band's examples.")
    hi: float = Field(description="Strongest activation among the band's examples.")
    examples: list[Example]


class LogitEffects(_Model):
    """The decoder direction through the final norm's scale and the unembedding."""

    pos: list[tuple[int, float]] = Field(description="[token id, logit] the feature raises most.")
    neg: list[tuple[int, float]] = Field(description="[token id, logit] it lowers most.")


class FeaturePage(_Model):
    """Everything the viewer shows about one feature."""

    id: int = Field(ge=0)
    label: str = Field(description="Automatic label from the top examples.")
    label_confidence: float = Field(description="Share of top examples peaking on the label's token.")
    explanation: str | None = Field(default=None, description="The explainer's explanation, if one ran.")
    explanation_score: float | None = Field(default=None, description="Its detection score.")
    density: float = Field(ge=0, description="Share of tokens the feature fires on.")
    count: int = Field(ge=0, description="Firings on the atlas tokens.")
    max_act: float
    mean_act: float = Field(description="Mean activation over firings.")
    hist: list[int] = Field(description="Firings per activation bin (edges: meta hist_log10).")
    top: list[Example] = Field(description="Top examples, strongest first, one per window.")
    bands: list[Band] = Field(description="Quantile bands, weakest first.")
    neighbours: list[tuple[int, float]] = Field(description="[feature, decoder cosine], nearest first.")
    cofire: list[tuple[int, float]] = Field(description="[feature, Jaccard index] of co-firing.")
    labels: dict[str, str] = Field(description="Label of each feature the page links to.")
    logits: LogitEffects | None = Field(default=None, description="Absent for models without an LM head.")
    vocab: dict[str, str] = Field(description="Text of each token id the page uses.")


class DensityHistogram(_Model):
    lo: float
    hi: float
    counts: list[int] = Field(description="Features per log10-density bin.")
    dead: int = Field(ge=0, description="Features that never fired.")


class SAERef(_Model):
    path: str
    cfg: dict[str, Any]


class AtlasMeta(BaseModel):
    """The atlas as a whole (its ``meta`` table); readers keep keys they do not know."""

    model_config = ConfigDict(extra="allow")

    format_version: int
    saelab_version: str
    created: str
    sae: SAERef
    model: str
    hook_name: str
    corpus: str
    tokens: int
    windows: int
    context_length: int
    n_features: int
    has_logits: bool
    settings: dict[str, Any]
    metrics: dict[str, Any] = Field(description="FVU, L0, dead, CE loss recovered, ... of the SAE.")
    hist_log10: tuple[float, float, int] = Field(description="Activation histogram bins: lo, hi, count.")
    density_hist: DensityHistogram
    relatives: dict[str, str | None] | None = Field(
        default=None, description="Other dictionaries' atlases (added by add_relatives).")


def schema() -> dict[str, Any]:
    """The JSON schemas the viewer checks pages and meta against."""
    return {"page": FeaturePage.model_json_schema(), "meta": AtlasMeta.model_json_schema()}


__all__ = ["AtlasMeta", "Band", "DensityHistogram", "Example", "FeaturePage", "LogitEffects", "schema"]
