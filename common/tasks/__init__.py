"""Tasks: each owns its loss, metrics and training and evaluation loops."""
