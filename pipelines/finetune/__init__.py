"""finetune: fine-tuning a base model for chat (stage.py says what goes in and comes out)."""
