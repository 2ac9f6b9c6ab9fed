"""sandlab: recipes for training reasoning models on synthetic (SAND-style) data."""

__version__ = "0.1.0"
