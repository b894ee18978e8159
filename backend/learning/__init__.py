"""What reviews teach: Label Studio annotations compared with the backend's predictions (reviews.py), per-label
precision, recall and suggested thresholds (thresholds.py), and their plot (plot.py). Pure: no Redis, no HTTP."""
