"""dsarag: kernels."""
