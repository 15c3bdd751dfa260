"""Text sources to token shards."""

from lmfleet.data.corpus import Corpus, prepare_corpus

__all__ = ["Corpus", "prepare_corpus"]
