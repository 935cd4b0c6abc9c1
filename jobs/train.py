"""`python jobs/train.py [--config FILE] [key=value ...]` == `breakhis-ray train ...` (works with ray job submit)."""

import sys

from _entry import run


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's) as ``breakhis-ray train`` does, run it; the exit status."""
    return run("train", argv)


if __name__ == "__main__":
    sys.exit(main())
