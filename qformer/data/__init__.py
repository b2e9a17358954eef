"""Data: annotation readers, builders, processors, the Ray Data pipeline, synthetic data.

Public API (see each module):
  pipeline.build_train_datasets(cfg, plan=...) -> TrainData(datasets, ratios, num_rows, mean, std)
      rows {"image": uint8 [3,S,S] augmented, "text_ids"/"text_atts": int64 [max_txt_len],
      "unit"/"unit_rows": the stream position (position.PositionTracker pops them)}
  shard_source.ShardStream: image-text shards (wds/parquet/jsonl/csv, local or s3://), per pass
  shard_records.read_samples(shards, path, reading): one shard streamed, losses by reason (no Ray)
  position.StreamPosition / PositionTracker / create_plan: where a stream is, kept in checkpoints
  storage.expand(spec) / missing(paths) / filesystem(uri): shard patterns and object storage
  pipeline.build_eval_split(cfg, split) -> RetrievalSplit (image_paths, texts, img2txt, txt2img,
      image_ids, .images(batch_size) iterator, .ray_dataset() of {"index","image"})
  normalize.normalize_uint8(images, mean, std) -> float CLIP-normalised, on the images' device
  stats.training_losses() -> the run's lost training samples by reason (kept in checkpoints)
  images.load_rgb(path) -> RGB PIL image or ImageDecodeError; annotations.read_caption_file(path)
  synth.write_synthetic(out, ...), synth_shards.write_shards(out, fmt, ...), check.check_config(cfg)
Importing this package registers the builders (`coco_caption`, `vg_caption`, and the image-text
pair builders `image_text_shards`, `conceptual_caption_3m`, `conceptual_caption_12m`, `sbu_caption`,
`laion400m`) and processors
(`blip_caption`, `blip2_image_train`, `blip_image_train`, `blip_image_eval`).
Heavy pieces (Ray, transformers) are imported inside functions.
"""
from qformer.data import builders, processors  # noqa: F401  (registers)
