"""The Label Studio format: labeling-config parsing, task data, brush RLE, result JSON, model_version.

Pure functions on plain data: no torch, no HTTP, no environment.
"""
