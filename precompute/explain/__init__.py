"""LLM explanations of SAE features: prompts (delphi's format), chat backends, detection/fuzzing scoring (BM25 search
of explanations lives with the store: store/search.py).

    from saescope.precompute.explain import LocalChatBackend, FeatureMaterial, Example, explain_feature, score_explanation
"""

from .backends import ChatBackend, Completion, LLMError, LocalChatBackend, OpenAIChatBackend
from .prompts import (
    PROMPT_VERSION,
    Example,
    ExplainConfig,
    FeatureMaterial,
    HeldOutSplit,
    material_from_contexts,
    split_material,
    zero_contexts,
)
from .scoring import ScoreResult, detection_score, explain_feature, explain_features, fuzzing_score, score_explanation

__all__ = [
    "PROMPT_VERSION", "ChatBackend", "Completion", "Example", "ExplainConfig", "FeatureMaterial", "HeldOutSplit",
    "LLMError", "LocalChatBackend", "OpenAIChatBackend", "ScoreResult", "detection_score", "explain_feature",
    "explain_features", "fuzzing_score", "material_from_contexts", "score_explanation", "split_material",
    "zero_contexts",
]
