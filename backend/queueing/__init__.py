"""The queue layer: Redis connections, enqueueing and waiting (API side), the worker process. No model code."""
