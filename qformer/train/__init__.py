"""Training on one worker: the train step, optimiser, LR schedules, AMP, checkpoints, resume, preemption, and
the loop that calls them (`worker.train_loop_per_worker` is Ray Train's entry point; `qformer.jobs.train_job`
launches it). Import submodules directly; this package stays light.
"""
