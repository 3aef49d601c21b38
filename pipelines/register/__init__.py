"""The register stage (`python -m pipelines.register`): see stage.py."""
