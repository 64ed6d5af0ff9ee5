"""Training and evaluation (the ``[train]`` extra): BBC and user data (``data.py``), checkpoint
conversion (``convert.py``), the ELBERT loss and loop (``train.py``), threshold search and scoring
(``scoring.py``), ``evaluate.py``, the model card and plots. Not needed by a serving replica."""
