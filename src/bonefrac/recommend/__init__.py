"""Sourced, conservative treatment recommendations for a model result (decision support)."""

from bonefrac.recommend.engine import (
    KnowledgeError,
    Recommendation,
    RecommendationContext,
    confidence_band,
    load_knowledge,
    recommend,
)

__all__ = [
    "KnowledgeError",
    "Recommendation",
    "RecommendationContext",
    "confidence_band",
    "load_knowledge",
    "recommend",
]
