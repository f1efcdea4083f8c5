"""Transformer++ tiny."""
