"""Gold scorers: a held-out judge of completions, standing in for human
labelers in the demo. The policy never trains on it; comparing it with the
proxy reward shows over-optimization (proxy up, gold flat or down)."""

from __future__ import annotations

from collections.abc import Callable


def _vader() -> Callable[[str], float]:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    # VADER's compound score: normalized sentiment in [-1, 1].
    return lambda text: float(analyzer.polarity_scores(text)["compound"])


GOLD_SCORERS: dict[str, Callable[[], Callable[[str], float]]] = {"vader": _vader}


def make_gold_scorer(name: str) -> Callable[[str], float]:
    try:
        return GOLD_SCORERS[name]()
    except KeyError:
        raise ValueError(f"unknown gold scorer {name!r}; known: {', '.join(sorted(GOLD_SCORERS))}") from None
