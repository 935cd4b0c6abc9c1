"""`python jobs/split.py [--config FILE] [key=value ...]` == `breakhis-ray split ...` (works with ray job submit)."""

import sys

from _entry import run


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's) as ``breakhis-ray split`` does, run it; the exit status."""
    return run("split", argv)


if __name__ == "__main__":
    sys.exit(main())
