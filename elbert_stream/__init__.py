"""elbert-stream: streaming ELBERT inference with continuous batching over early-exit depths."""

__version__ = "0.1.0"
