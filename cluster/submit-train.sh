#!/usr/bin/env bash
# Submit `python -m jobs.train FLAGS...` to a Ray cluster and wait for it.
#
#   cluster/submit-train.sh --data s3://bucket/data/hym --model mobilenet_v2 \
#       --pretrained s3://bucket/weights/mobilenet_v2.pth --output s3://bucket/runs/hym \
#       --workers 8 --epochs 10 --batch-size 64
#
# The same command after a failure resumes from the last checkpoint under --output.
# --help explains the environment settings and exit codes (cluster/submit-common.sh).
set -euo pipefail
# shellcheck source=cluster/submit-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/submit-common.sh"
clf_submit train "$@"
