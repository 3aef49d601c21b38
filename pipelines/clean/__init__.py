"""The clean stage (`python -m pipelines.clean`): see stage.py."""
