"""`python jobs/prepare.py [--config FILE] [key=value ...]` == `breakhis-ray prepare ...` (works with ray job submit)."""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("prepare"))
