"""The chat_register stage (`python -m pipelines.chat_register`): see stage.py."""
