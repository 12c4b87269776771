"""Tests for alignd."""
