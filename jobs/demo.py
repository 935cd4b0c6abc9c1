"""`python jobs/demo.py [--config FILE] [key=value ...]` == `breakhis-ray demo ...` (works with ray job submit)."""

import sys

from _entry import run


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's) as ``breakhis-ray demo`` does, run it; the exit status."""
    return run("demo", argv)


if __name__ == "__main__":
    sys.exit(main())
