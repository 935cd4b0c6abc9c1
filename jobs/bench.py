"""`python jobs/bench.py [--config FILE] [key=value ...]` == `breakhis-ray bench ...` (works with ray job submit)."""

import sys

from _entry import run


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's) as ``breakhis-ray bench`` does, run it; the exit status."""
    return run("bench", argv)


if __name__ == "__main__":
    sys.exit(main())
