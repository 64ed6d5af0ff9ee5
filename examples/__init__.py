"""examples/: runnable examples from a source checkout (``make demo`` runs ``examples/demo.py``)."""
