"""Evaluation: zero-shot classification, retrieval, metrics with bootstrap confidence intervals."""
