"""alignd workers: the job runner (no torch) and the training child (workers.training, torch)."""
