"""Importers for other projects' checkpoints."""
