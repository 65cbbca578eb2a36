"""What every other package may import: user-facing errors, atomic writes, and where dsarag keeps its files."""
