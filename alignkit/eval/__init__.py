"""Evaluation: proof that a model got better."""
