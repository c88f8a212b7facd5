"""nexttok: next-token prediction made visible — a language model is a classifier over its
vocabulary, run in a loop."""

from nexttok import gc_pause

with gc_pause.paused():  # torch and friends: no collections while their objects arrive (gc_pause.py)
    from nexttok.distribution import Distribution, Row, TokenProb
    from nexttok.errors import NexttokError
    from nexttok.evaluation import EvalResult, evaluate
    from nexttok.generate import Step, generate
    from nexttok.lm import LM, load
    from nexttok.processors import (
        FrequencyPenalty,
        LogitBias,
        MinP,
        PresencePenalty,
        RepetitionPenalty,
        Temperature,
        TopK,
        TopP,
        Typical,
        build_processors,
    )
    from nexttok.sampling import SamplingConfig
    from nexttok.train import BatchSource, FitResult, TrainConfig, fit

__all__ = ["LM", "Distribution", "NexttokError", "Row", "TokenProb", "load"]
__all__ += ["SamplingConfig", "Step", "build_processors", "generate"]
__all__ += ["FrequencyPenalty", "LogitBias", "MinP", "PresencePenalty", "RepetitionPenalty", "Temperature", "TopK"]
__all__ += ["TopP", "Typical"]
__all__ += ["BatchSource", "FitResult", "TrainConfig", "fit", "EvalResult", "evaluate"]
__version__ = "0.1.0"
