"""Pretraining objectives; each returns a dict of named, unweighted loss terms."""
