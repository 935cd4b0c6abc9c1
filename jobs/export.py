"""`python jobs/export.py [--config FILE] [key=value ...]` == `breakhis-ray export ...` (works with ray job submit)."""

import sys

from _entry import run


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's) as ``breakhis-ray export`` does, run it; the exit status."""
    return run("export", argv)


if __name__ == "__main__":
    sys.exit(main())
