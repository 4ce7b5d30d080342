"""Task loaders: GLUE, E2E, commonsense reasoning, instruction following (local files or the Hub)."""
