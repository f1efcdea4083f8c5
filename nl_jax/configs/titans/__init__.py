"""Titans tiny."""
