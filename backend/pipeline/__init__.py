"""The model pipeline: Grounding DINO boxes from text, SAM masks from boxes.

Knows torch, transformers and segment-anything; knows nothing of Label Studio, rq or the environment.
"""
