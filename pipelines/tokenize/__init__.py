"""The tokenize stage (`python -m pipelines.tokenize`): see stage.py."""
