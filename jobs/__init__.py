"""Entrypoints: `python -m jobs.<name>`; each parses arguments and calls into `pipeline`."""
