"""dsarag: rag."""
