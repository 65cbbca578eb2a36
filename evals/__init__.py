"""dsarag: evals."""
