"""dsarag: corpora."""
