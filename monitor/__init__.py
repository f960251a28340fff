"""Acoustic anomaly-detection daemon for machine sounds (DCASE 2025 Task 2 style)."""

__version__ = "0.1.0"
