"""nexttok: next-token prediction made visible — a language model is a classifier over its
vocabulary, run in a loop."""

from nexttok.distribution import Distribution, Row, TokenProb
from nexttok.errors import NexttokError
from nexttok.lm import LM, load

__all__ = ["LM", "Distribution", "NexttokError", "Row", "TokenProb", "load"]
__version__ = "0.1.0"
