"""Training and fine-tuning recipes that produce model packages."""
