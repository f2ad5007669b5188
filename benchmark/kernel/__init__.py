"""The kernel: registry, plugins, errors, cache and progress. It imports nothing else of the project."""
