"""The metadata contract every exporter fills in.

Kept apart from the registry, which imports every exporter: an exporter that needs these
imports this module instead, so no exporter depends on the registry.
"""

from __future__ import annotations

from monitor.scoring.metadata import BackboneMetadata

WINDOW_SECONDS = 10.0


def metadata(name: str, rate: int, dim: int, frontend: str, licence: str, min_seconds: float = 0.0) -> BackboneMetadata:
    """Metadata for a new export; exporter_version and model_id are filled in by
    ``export_backbone`` from the built module."""
    return BackboneMetadata(name, rate, WINDOW_SECONDS, dim, frontend, licence, "", "", min_seconds=min_seconds)
