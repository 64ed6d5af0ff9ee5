"""Ray Serve: the only package that imports Ray.

``deployment.py`` (the replica, its HTTP routes and ``app``) · ``overrides.py`` (how a replica's settings
are merged) · ``autoscaling.py`` (the exit-depth policy, controller side) · ``local.py`` (a local Ray for
the demo, the benchmark and the tests).
"""
