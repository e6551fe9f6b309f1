"""simple-nmt: neural machine translation with reinforcement-learning fine-tuning."""

__version__ = "0.1.0"
