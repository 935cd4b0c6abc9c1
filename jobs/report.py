"""`python jobs/report.py [--config FILE] [key=value ...]` == `breakhis-ray report ...` (works with ray job submit)."""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("report"))
