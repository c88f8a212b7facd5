"""How well a model predicts the next token: perplexity, bits per byte/char, accuracy, calibration, and
what separates two models, all from one scoring path (:mod:`nexttok.evaluation.scoring`).

The names below load on first use: the pretraining batches import :mod:`.windows` from here, and the
pipeline imports them."""

from importlib import import_module

_WHERE = {
    "EvalResult": "pipeline",
    "TemperatureFit": "pipeline",
    "evaluate": "pipeline",
    "evaluate_source": "pipeline",
    "Metrics": "metrics",
    "PairResult": "pair",
    "evaluate_pair": "pair",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'nexttok.evaluation' has no attribute '{name}'")
    return getattr(import_module(f"nexttok.evaluation.{_WHERE[name]}"), name)
