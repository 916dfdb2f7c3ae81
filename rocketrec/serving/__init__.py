"""Serving: the exported light module, its manifest, requests, and export from a checkpoint.

module.py    LightServing: the portable scripted module (forward, score_candidates)
fused.py     FusedLightServing: the default export, on the fused operator (ops.py)
ops.py       the operator library (deploy/cpp/rocketrec_ops.cpp): load, config, load_model
manifest.py  manifest.json written inside the exported file
requests.py  JSON-lines requests (Python twin of deploy/cpp's parser)
export.py    export_checkpoint: checkpoint -> TorchScript file, behind a parity gate
"""

from rocketrec.serving.ops import try_load_library

try_load_library()  # fused models then load with plain torch.jit.load in this process
