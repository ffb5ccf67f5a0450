"""Using features on the model: steering generation with edited features, and attributing a
prediction to the features that drive it."""

from saelab.steer.attribution import Attribution, attribute
from saelab.steer.steering import MODES, Continuations, Edit, generate, next_token_logprobs, steering_fn

__all__ = [
    "MODES",
    "Attribution",
    "Continuations",
    "Edit",
    "attribute",
    "generate",
    "next_token_logprobs",
    "steering_fn",
]
