"""The top layer below the command line: the only code that wires the packages together.

Ray connection (`ray_cluster`), the training launcher (`train_job`), the eval job (`eval_job`), the frozen-ViT
feature-cache job (`cache_features`), sweeps (`sweep/`) and the offline demo (`demo`).
"""
