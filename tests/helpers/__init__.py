"""Shared test helpers (tiny models, synthetic data)."""
