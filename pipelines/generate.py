"""`python -m pipelines.generate` was renamed `python -m pipelines.cli`; this alias stays for one release."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
