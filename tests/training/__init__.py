"""Tests of the training child (workers.training)."""
