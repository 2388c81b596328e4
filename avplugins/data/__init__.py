"""Media decoding, manifests, features and datasets."""
