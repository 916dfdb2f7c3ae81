"""Serving: the exported light module, its manifest, requests, and export from a checkpoint.

module.py    LightServing: the scripted module (forward, score_candidates)
manifest.py  manifest.json written inside the exported file
requests.py  JSON-lines requests (Python twin of deploy/cpp's parser)
export.py    export_checkpoint: checkpoint -> TorchScript file, behind a parity gate
"""
