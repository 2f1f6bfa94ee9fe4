"""Task-agnostic machinery: trainer, checkpoints, tracking, loading, registry. Knows no task."""
