"""Entry point for `ray job submit ... -- python jobs/ads_train.py ...` (or run it directly:
with no cluster it starts a loopback-only local Ray). All logic lives in rocketrec.run.ray_driver."""

import sys

from rocketrec.run.ray_driver import main

if __name__ == "__main__":
    sys.exit(main())
