"""`python jobs/train_segmenter.py [--config FILE] [key=value ...]` == `breakhis-ray train-segmenter ...` (works with ray job submit)."""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("train-segmenter"))
