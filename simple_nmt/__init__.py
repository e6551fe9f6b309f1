"""simple-nmt: neural machine translation with reinforcement-learning fine-tuning."""

from simple_nmt.loading import LoadedModel, load

__all__ = ["LoadedModel", "load"]
__version__ = "0.1.0"
