"""One inference core for every consumer (eval, propose, the training rounds, report, bench):
the Predictor protocol, its backends, and the one pre- and postprocessing."""

from boxseg.predict.base import PRECISIONS, Predictor, default_precision
from boxseg.predict.load import BACKENDS, as_predictor, load_predictor, torch_predictor

__all__ = ["BACKENDS", "PRECISIONS", "Predictor", "as_predictor", "default_precision", "load_predictor",
           "torch_predictor"]
