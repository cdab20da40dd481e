"""`python -m emocast_lib.bench ...`: the benchmark (measure.py)."""
from .measure import main

if __name__ == "__main__":  # a spawned measuring process imports this module again: it must not rerun main
    main()
