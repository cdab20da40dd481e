"""`python -m emocast_lib {generate,make-tiny-models,convert} ...` (parsed in cli.py)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
