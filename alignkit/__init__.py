"""alignkit: post-training for open language models."""

__version__ = "0.1.0"
