"""The multi-modal multi-task model, its data and local training."""
