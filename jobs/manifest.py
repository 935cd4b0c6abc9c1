"""`python jobs/manifest.py [--config FILE] [key=value ...]` == `breakhis-ray manifest ...` (works with ray job submit)."""

import sys

from _entry import run


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's) as ``breakhis-ray manifest`` does, run it; the exit status."""
    return run("manifest", argv)


if __name__ == "__main__":
    sys.exit(main())
