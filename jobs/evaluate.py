"""`python jobs/evaluate.py [--config FILE] [key=value ...]` == `breakhis-ray evaluate ...` (works with ray job submit)."""

import sys

from _entry import run


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's) as ``breakhis-ray evaluate`` does, run it; the exit status."""
    return run("evaluate", argv)


if __name__ == "__main__":
    sys.exit(main())
