"""`python jobs/train_segmenter.py [--config FILE] [key=value ...]` == `breakhis-ray train-segmenter ...` (works with ray job submit)."""

import sys

from _entry import run


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's) as ``breakhis-ray train-segmenter`` does, run it; the exit status."""
    return run("train-segmenter", argv)


if __name__ == "__main__":
    sys.exit(main())
