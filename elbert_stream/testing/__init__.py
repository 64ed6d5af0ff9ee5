"""Test and demo support (the ``[testing]`` extra): the embedded Kafka-protocol broker (``broker.py``)
and end-to-end stream checks (``streamcheck.py``). Not needed by a serving replica."""
