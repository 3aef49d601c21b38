"""What every stage shares: typed params, atomic writes and hashing, MLflow tracking, the stage runner."""
