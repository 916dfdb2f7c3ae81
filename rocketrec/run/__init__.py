"""A training run, start to end: its settings from flags and config files
(`flags.py`, `config_file.py`), every start-up check and the run directory's end
(`prepare.py`: prepare_run / finish_run), and the Ray driver and workers
(`ray_driver.py`, what `jobs/ads_train.py` runs). The files under RUN/ are named by
`rocketrec.run.run_dir.RunDir`."""
