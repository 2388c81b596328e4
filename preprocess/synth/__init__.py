"""Deterministic synthetic audio-visual corpora (see `preprocess.synthetic` for the CLI)."""
