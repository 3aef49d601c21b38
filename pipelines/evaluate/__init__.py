"""The evaluate stage (`python -m pipelines.evaluate`): see stage.py."""
