"""The Feast feature repository (definitions and the CLI's feature_store.yaml)."""
