#!/usr/bin/env bash
# A local Ray head without Docker, then the tiny demo experiment submitted to it as a Ray job
# (docs/cluster.md, "A local Ray head without Docker"). Run it from anywhere:
#   bash platform/ray/local-head.sh
# tests/test_job_submit.py starts its own head with this script's activation and head-start lines.
set -eo pipefail

# The paths below (.venv, experiments/, --working-dir .) are relative to the repository root.
cd "$(dirname "$0")/../.."

# Activate the project's virtualenv BEFORE starting the head: job drivers inherit the head's
# environment, its PATH included, so this is where a job finds `qformer` and the Python it runs
# with. Started as `.venv/bin/ray ...` without activating, every job fails with
# "/bin/sh: 1: qformer: not found" (exit 127).
. .venv/bin/activate

# Token authentication with a fresh token: the head and every client (`ray job submit`) present it.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(python -c "import secrets; print(secrets.token_hex(32))")

# The head: GCS, dashboard and job API on 127.0.0.1:8265 only, 2 CPUs, no usage statistics.
ray start --head --dashboard-host 127.0.0.1 --num-cpus 2 --disable-usage-stats

# The synthetic shapes data set the tiny experiment trains on (under QFORMER_HOME, ~/.qformer).
qformer data synth --out ~/.qformer/data/synth_shapes

# Submit the training run. The job's working directory is a temporary copy of the repository that
# Ray deletes; runs, checkpoints and the MLflow store go under QFORMER_HOME (~/.qformer). The demo's config trains
# in Train local mode (one process); run.ray.num_workers=1 puts the loop on a Ray Train worker of the cluster.
ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
    qformer train --cfg-path experiments/demo/tiny_shapes.yaml --options run.ray.num_workers=1

# The head keeps running after this script. `ray stop` ends it, and also every other Ray cluster on
# the machine, other users' included.
