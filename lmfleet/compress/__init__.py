"""Compression and its yardstick: perplexity."""

from lmfleet.compress.evaluate import evaluate_perplexity

__all__ = ["evaluate_perplexity"]
