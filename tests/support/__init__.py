"""Helpers the tests (and bench/) import: ports, paths, an image server, backend processes, a Redis for tests.

Conftests only define fixtures over these; no test imports a conftest or another test module.
"""
