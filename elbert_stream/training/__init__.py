"""Training and evaluation (the ``[train]`` extra): corpora and split files (``data.py``), the user's
files (``files.py``), a run's and a model's splits (``splits.py``), checkpoint conversion
(``convert.py``), the ELBERT loss and loop (``train.py``, ``progress.py``), threshold search and
scoring (``scoring.py``), ``evaluate.py``, the model card and plots. Not needed by a serving replica."""
