"""Corpus preparation: manifests, counts, vocabularies, mouth crops, synthetic corpora."""
