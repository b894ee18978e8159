"""Label Studio ML backend: Grounding DINO boxes from label names, SAM masks on each box, queued with rq."""
