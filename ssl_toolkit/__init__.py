"""Self-supervised pretraining: data, methods, trainer, logging and evaluation."""
