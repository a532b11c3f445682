#!/usr/bin/env bash
# Submit `python -m jobs.label FLAGS...` to a Ray cluster and wait for it.
#
#   cluster/submit-label.sh --model s3://bucket/runs/hym/model --input s3://bucket/archive \
#       --output s3://bucket/labels/archive --skip-existing
#
# The same command after a failure labels only what no committed output file covers yet;
# --skip-existing also lets a newer model add to an existing --output (the nightly case).
# --help explains the environment settings and exit codes (cluster/submit-common.sh).
set -euo pipefail
# shellcheck source=cluster/submit-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/submit-common.sh"
clf_submit label "$@"
