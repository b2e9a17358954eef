"""Training: optimiser + LR schedules, the per-micro-batch step, the Ray Train worker loop and launcher.

Import submodules directly (`qformer.train.launcher`, `qformer.train.step`); this package stays light.
"""
