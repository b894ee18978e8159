"""Image fetching: task image references (URLs, Label Studio paths, cloud URIs, local files) → RGB PIL images.

Knows Label Studio's URL and token conventions; knows nothing of models, rq or the environment.
"""
