"""The `grounded-sam` commands: serve, worker, health (main.py), predict on local files (predict.py), and the
bulk prelabel / status / retry commands that drive a running backend (bulk.py)."""
