"""rocketrec: Rocket Launching CTR training on TorchRec.

A deep booster tower and a light serving tower share sharded embedding tables
and train together; only the light tower is exported for C++ serving.
"""

__version__ = "0.1.0"
