"""dsarag: indexer_model."""
