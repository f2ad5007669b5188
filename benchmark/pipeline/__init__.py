"""The pipeline stages: data, models, fine-tuning, the black-box target, metrics and records.

Each module imports only the kernel and the stages below it, never `attacks`, `defenses` or the applications.
"""
