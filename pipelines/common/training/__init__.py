"""What the training stages (train, finetune) share: safe checkpoints, resume folders, the LightningModule's
optimisation, the Trainer, and the curves they log."""
