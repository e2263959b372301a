"""ckpteval: evaluate language-model checkpoints and log every result, with its config, to MLflow."""

__version__ = "0.1.0"
