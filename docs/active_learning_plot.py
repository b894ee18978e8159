"""Draw docs/active_learning.png, the README's example of `grounded-sam report --plot`, from made-up reviews.

Run from the repository root: `python docs/active_learning_plot.py`. The reviews are constructed (seeded), shaped
like the loop's motivating case: "bicycle" boxes mostly deleted below 0.45, "person" masks kept down to 0.25.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backend.learning.plot import write_plot
from backend.learning.reviews import ReviewedObject
from backend.learning.thresholds import label_reports

OUT = Path(__file__).with_name("active_learning.png")


def reviews(label: str, kept: np.ndarray, deleted: np.ndarray, missed: int) -> list[ReviewedObject]:
    return [
        *(ReviewedObject(label, "kept", float(score)) for score in kept),
        *(ReviewedObject(label, "deleted", float(score)) for score in deleted),
        *(ReviewedObject(label, "missed", None) for _ in range(missed)),
    ]


def main() -> None:
    rng = np.random.default_rng(16)
    objects = [
        *reviews("bicycle", rng.uniform(0.42, 0.9, 40), rng.uniform(0.3, 0.48, 25), 4),
        *reviews("person", rng.uniform(0.25, 0.95, 60), rng.uniform(0.3, 0.4, 4), 6),
    ]
    write_plot(label_reports(objects, min_reviews=20), OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
