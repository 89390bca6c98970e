"""The version of vlmscope (read by pyproject.toml at build time; no imports)."""

__version__ = "0.1.0"
