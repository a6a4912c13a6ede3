"""Command-line entry points: one click command per file."""
