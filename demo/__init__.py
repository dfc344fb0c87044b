"""Demo material made here, since nothing can be downloaded: a small base model and task data."""
