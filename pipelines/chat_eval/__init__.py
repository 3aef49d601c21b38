"""The chat_eval stage (`python -m pipelines.chat_eval`): the chat model next to its base; see stage.py."""
