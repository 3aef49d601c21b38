"""Registering a model version in MLflow and deciding its champion: shared by register and chat_register."""
