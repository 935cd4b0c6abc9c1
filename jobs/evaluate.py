"""`python jobs/evaluate.py [--config FILE] [key=value ...]` == `breakhis-ray evaluate ...` (works with ray job submit)."""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("evaluate"))
