"""bench/: the benchmarks (not installed). ``python -m bench PART`` or ``elbert-stream bench PART``
from a checkout; results go to bench/results/."""
