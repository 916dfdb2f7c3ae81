"""Checkpoints: their files, what they hold, and what a resume or warm start may do with them.

files.py       layout under RUN/checkpoints/, atomic save, load, CRC-32 verification,
               latest_checkpoint (skips damaged ones), read_meta
meta.py        meta.json: the Trainer's state_dict(), the spec, the job config (once)
tables.py      CheckpointTables (row blocks, one saved chunk at a time), load_towers,
               load_unsharded
resume.py      the resume rules (what may change, sharding kinds across world sizes,
               optimizer state that starts fresh); save_model / load_model of the DMP
warm_start.py  --init-from: another run's weights into a new, possibly changed model

Others import these modules directly (no re-exports): an import path says where
the code lives.
"""
