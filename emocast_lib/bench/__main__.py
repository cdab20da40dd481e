"""`python -m emocast_lib.bench ...`: the benchmark (measure.py)."""
from .measure import main

main()
