"""hift_rt: hierarchical full-parameter fine-tuning runtime."""
