"""Code shared by the hospital side and the coordinator: config, data, models, metrics."""

__version__ = "0.1.0"
