#!/usr/bin/env bash
# A single-machine Ray cluster with token auth and its dashboard on 127.0.0.1, to submit clf
# jobs to as if it were a real cluster (the same `ray job submit` path as cluster/submit-*.sh use).
#
#   cluster/local-head.sh start [RAY_START_FLAGS...]   e.g. start --num-cpus 8 --num-gpus 1
#   cluster/local-head.sh status
#   cluster/local-head.sh stop
#
# Token auth: `ray start --head` turns token auth on only when RAY_AUTH_MODE=token or a token
# already exists; unlike `ray.init()` it never creates one. So `start` first makes sure
# ~/.ray/auth_token exists (`ray get-auth-token --generate`, which keeps an existing token),
# then starts the head with RAY_AUTH_MODE=token. Every Ray process on this machine reads that
# file; `ray job` commands send it when RAY_AUTH_MODE=token (submit-*.sh set that for you).
#
# Environment: RAY_PORT (GCS, default 6379), RAY_DASHBOARD_PORT (default 8265), and the
# object-store settings (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, ...): the
# head and its workers inherit this shell's environment, so export them before `start`.
set -euo pipefail

port="${RAY_PORT:-6379}"
dashboard_port="${RAY_DASHBOARD_PORT:-8265}"
dashboard="http://127.0.0.1:$dashboard_port"

usage() {
    sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

start() {
    command -v ray >/dev/null || {
        echo "local-head.sh: error: no \`ray\` on PATH (source .venv/bin/activate)" >&2
        exit 2
    }
    ray get-auth-token --generate >/dev/null
    # Ray keeps one idle worker per CPU and restarts the rest for each task; the label job's
    # writes ask for no CPU and need 4 more (clf.runtime.SPARE_WORKERS).
    RAY_num_workers_soft_limit="${RAY_num_workers_soft_limit:-$(($(getconf _NPROCESSORS_ONLN) + 4))}" \
        RAY_AUTH_MODE=token ray start --head \
        --port "$port" \
        --dashboard-host 127.0.0.1 \
        --dashboard-port "$dashboard_port" \
        --disable-usage-stats \
        "$@"
    cat <<EOF

Ray head on port $port (dashboard $dashboard), token auth on (~/.ray/auth_token).
Submit jobs from the repository root. A submitted job runs in an uploaded copy of the
repository, so give absolute paths (or s3:// URIs), not paths relative to this checkout:

  export RAY_API_SERVER_ADDRESS=$dashboard RAY_AUTH_MODE=token
  cluster/submit-train.sh --data \$PWD/data/hym --model mobilenet_v2 --output \$PWD/runs/hym --workers 2
  cluster/submit-label.sh --model \$PWD/runs/hym/model --input ~/photos --output \$PWD/labels/photos

or by hand:

  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python -m jobs.train ...

\`python -m jobs.NAME ...\` run directly on this machine joins this head as well.
Stop it with: cluster/local-head.sh stop
EOF
}

case "${1-}" in
    start) shift; start "$@" ;;
    stop) ray stop ;;
    status) RAY_AUTH_MODE=token ray status --address "127.0.0.1:$port" ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
