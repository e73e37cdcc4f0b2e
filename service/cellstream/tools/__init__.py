"""Command-line tools: the `cellstream` command, models check, replay, PyTorch export, demo data."""
