"""Retrieval evaluation as LAVIS computes it (spec §6).

- metrics.retrieval_metrics: Recall@1/5/10 both ways, means, r_mean, agg_metrics (= txt_r_mean);
- rerank: coarse ITC similarity (max over queries) and the ITM re-rank of the top k_test (model-free);
- retrieval.evaluate_retrieval: a model on an eval split, in one process or on every rank of a group;
- runner.evaluate_checkpoint: `qformer eval` (Ray Train workers or --local, logged to MLflow);
- learning.train_and_compare: retrieval before/after a short in-process training (proof of learning);
- visuals: the pictures of an evaluated split for MLflow: gallery (retrieval gallery from the score
  matrices) and attention_grid (query cross-attention heat maps), drawn with drawing's Pillow helpers.
Import the submodules directly; this package stays light.
"""
