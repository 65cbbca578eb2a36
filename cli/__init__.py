"""dsarag: cli."""
