"""Entry point for `ray job submit ... -- python jobs/ads_train.py ...` (or run it directly:
with no cluster it starts a loopback-only local Ray). All logic lives in rocketrec.ray_train."""

import sys

from rocketrec.ray_train import main

if __name__ == "__main__":
    sys.exit(main())
