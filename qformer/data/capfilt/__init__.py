"""CapFilt (BLIP-2 paper §3.4): synthetic captions for web images, ranked with the web caption by CLIP.

`qformer data capfilt` generates `num_captions` captions per image with an image-captioning model
(nucleus sampling, seeded per sample), scores them and the original caption with a CLIP model, keeps the
top `keep` and writes each input shard again, same format, with a `captions` list and their scores per
sample; training draws one of them per pass (qformer.data.shard_source).

  sampling.py  per-sample seeds and the seeded nucleus sampler used inside transformers' generate
  ranking.py   candidates, ranking, keeping; the per-shard statistics and the summary
  stages.py    model loading (offline check), the decode function, the Captioner and Scorer actors
  shards.py    input rows for the Ray pipeline, output names, atomic shard writers
  pipeline.py  the Ray Data batch job (decode tasks, captioner and scorer actor pools) and its driver loop
  tiny.py      random few-layer captioner and CLIP models (tests, `qformer bench capfilt`, offline trials)
"""
