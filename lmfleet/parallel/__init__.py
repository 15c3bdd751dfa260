"""Process groups and the wrappers that parallelise an unmodified model."""
