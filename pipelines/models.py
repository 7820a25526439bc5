"""`python -m pipelines.models` was renamed `python -m pipelines.registry`; this alias stays for one release."""
import sys

from .registry import main

if __name__ == "__main__":
    sys.exit(main())
