"""The version of hf_contaccum (one place: pyproject.toml reads it too)."""
__version__ = "0.2.0"
