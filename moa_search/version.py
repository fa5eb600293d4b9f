"""The package version, at the bottom of the import layers (plans and provenance record it)."""
__version__ = "0.1.0"
