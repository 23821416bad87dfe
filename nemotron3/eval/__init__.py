"""Evaluation: language-model loss / perplexity and MTP per-depth accuracy on held-out text."""
