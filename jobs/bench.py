"""`python jobs/bench.py [--config FILE] [key=value ...]` == `breakhis-ray bench ...` (works with ray job submit)."""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("bench"))
