"""The train stage (`python -m pipelines.train`): see stage.py."""
