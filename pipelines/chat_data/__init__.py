"""The chat_data stage (`python -m pipelines.chat_data`): see stage.py."""
