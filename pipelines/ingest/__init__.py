"""The ingest stage (`python -m pipelines.ingest`): see stage.py."""
