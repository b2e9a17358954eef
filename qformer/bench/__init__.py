"""Benchmarks: every figure is a ratio against a baseline measured in the same run.

Imports: `qformer --help` imports every suite module (qformer.commands.bench builds each suite's
arguments from it), so a suite imports at module level only the standard library, numpy, qformer.core,
qformer.config.batch_plan and the other bench modules. torch, Ray, MLflow, pandas, the data stack
(qformer.data pulls in PIL and the processors), the model and the training code are imported inside
the functions that run the bench; each such import carries a `# lazy:` comment pointing here.
"""
