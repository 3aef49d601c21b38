"""Prefect flows that chain the DVC stages, training, evaluation, registration and serving (orchestration issue)."""
