"""`python jobs/cv.py [--config FILE] [key=value ...]` == `breakhis-ray cv ...` (works with ray job submit)."""

import sys

from _entry import run


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's) as ``breakhis-ray cv`` does, run it; the exit status."""
    return run("cv", argv)


if __name__ == "__main__":
    sys.exit(main())
