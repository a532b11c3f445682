# shellcheck shell=bash
# Shared by submit-train.sh and submit-label.sh: submit one clf job with `ray job submit`, wait
# for it, and exit 0 only when Ray reports it SUCCEEDED. Sourced, not run.
#
# Settings (environment):
#   RAY_API_SERVER_ADDRESS  dashboard URL of the cluster (default: $RAY_ADDRESS, else
#                           http://127.0.0.1:8265, the head started by cluster/local-head.sh)
#   RAY_AUTH_MODE           set to "token" automatically when a token is at hand
#                           (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)
#   CLF_RUN_NAME            name in the submission id (default: last part of --output)
#   CLF_DRY_RUN=1           print the `ray job submit` command and exit
#   CLF_NO_WAIT=1           submit and return; follow with `ray job logs -f ID`
#   CLF_POLL_SECONDS        seconds between status checks once the log stream ends (default 15)
#   PYTHON                  an interpreter that imports ray, for status checks (default: the one
#                           beside the `ray` on PATH, else python3)
#
# Exit codes: 0 succeeded; 1 failed or stopped; 2 usage; 3 another job on the same --output is
# still running; 130 interrupted (the job keeps running on the cluster).

CLF_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

clf_usage() {  # $1: job name
    cat <<EOF
usage: cluster/submit-$1.sh JOB_FLAGS...

Submits \`python -m jobs.$1 FLAGS...\` to a Ray cluster with the repository as working_dir and
cluster/runtime_env.yaml, waits for it, and exits 0 only if the job succeeded. --output is
required. Re-running the same command after a failure resumes into the same --output; a new
submission id (run name + UTC time) is made each time.

Flags are those of \`python -m jobs.$1 --help\`; they are checked on the cluster before Ray starts.

Environment: RAY_API_SERVER_ADDRESS (default \$RAY_ADDRESS or http://127.0.0.1:8265),
RAY_AUTH_MODE/RAY_AUTH_TOKEN (token auth; ~/.ray/auth_token is used when present),
CLF_RUN_NAME, CLF_DRY_RUN=1, CLF_NO_WAIT=1, CLF_POLL_SECONDS, PYTHON.
Exit codes: 0 succeeded, 1 failed or stopped, 2 usage, 3 a job on the same --output is running,
130 interrupted (the job keeps running on the cluster).
EOF
}

clf_output_of() {  # the value of --output in "$@", or nothing
    while (($#)); do
        case "$1" in
            --output) echo "${2-}"; return ;;
            --output=*) echo "${1#--output=}"; return ;;
        esac
        shift
    done
}

clf_run_name() {  # s3://bucket/runs/hym/ -> hym, reduced to characters safe in an id
    local name="${CLF_RUN_NAME:-}"
    if [[ -z "$name" ]]; then
        name="${1%/}"
        name="${name##*/}"
    fi
    name="$(printf '%s' "$name" | tr -c 'A-Za-z0-9._-' '-')"
    echo "${name:-run}"
}

clf_json_string() {  # a JSON string literal
    local s="${1//\\/\\\\}"
    s="${s//\"/\\\"}"
    printf '"%s"' "$s"
}

clf_setup_cluster_env() {
    export RAY_API_SERVER_ADDRESS="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}"
    # Ray's CLI sends the token only when RAY_AUTH_MODE=token; use it whenever a token is at hand.
    if [[ -z "${RAY_AUTH_MODE:-}" ]] &&
        [[ -n "${RAY_AUTH_TOKEN:-}" || -n "${RAY_AUTH_TOKEN_PATH:-}" || -s "$HOME/.ray/auth_token" ]]; then
        export RAY_AUTH_MODE=token
    fi
    if [[ -z "${PYTHON:-}" ]]; then
        local ray_bin
        ray_bin="$(command -v ray || true)"
        if [[ -n "$ray_bin" && -x "$(dirname "$ray_bin")/python" ]]; then
            PYTHON="$(dirname "$ray_bin")/python"
        else
            PYTHON=python3
        fi
    fi
    if ! "$PYTHON" -c 'import ray.job_submission' 2>/dev/null; then
        echo "cluster/submit: error: $PYTHON cannot import ray; activate the environment that" \
            "has ray (e.g. source .venv/bin/activate) or set PYTHON" >&2
        exit 2
    fi
}

clf_job_status() {  # $1: submission id -> PENDING|RUNNING|STOPPED|SUCCEEDED|FAILED
    "$PYTHON" - "$1" <<'PY'
import sys

from ray.job_submission import JobSubmissionClient

print(JobSubmissionClient().get_job_status(sys.argv[1]).value)
PY
}

clf_unfinished_jobs() {  # $1: job name, $2: output -> ids of unfinished jobs writing there
    "$PYTHON" - "$1" "$2" <<'PY'
import sys

from ray.job_submission import JobSubmissionClient

job, output = sys.argv[1:3]
for info in JobSubmissionClient().list_jobs():
    meta = info.metadata or {}
    if meta.get("clf_job") == job and meta.get("clf_output") == output:
        if not info.status.is_terminal():
            print(info.submission_id)
PY
}

clf_submit() {  # $1: job name (train|label); the rest: the job's flags
    local job="$1"
    shift
    local arg
    for arg in "$@"; do
        case "$arg" in
            -h | --help) clf_usage "$job"; exit 0 ;;
        esac
    done
    local output
    output="$(clf_output_of "$@")"
    if [[ -z "$output" ]]; then
        echo "cluster/submit-$job.sh: error: --output is required (see --help)" >&2
        exit 2
    fi
    # The job runs in an uploaded copy of the repository, on another machine.
    if [[ "$output" != *://* && "$output" != /* ]]; then
        echo "cluster/submit-$job.sh: error: --output $output: give an absolute path or an" \
            "s3:// URI; the job runs in an uploaded copy of the repository" >&2
        exit 2
    fi
    output="${output%/}"  # s3://b/x/ and s3://b/x are one output to the same-output guard
    local run id metadata
    run="$(clf_run_name "$output")"
    id="$job-$run-$(date -u +%Y%m%d-%H%M%S)-$(printf '%04x' "$((RANDOM))")"
    metadata="{\"clf_job\": $(clf_json_string "$job"), \"clf_output\": $(clf_json_string "$output")}"
    local submit=(ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml
        --submission-id "$id" --metadata-json "$metadata")
    [[ "${CLF_NO_WAIT:-}" == 1 ]] && submit+=(--no-wait)
    submit+=(-- python -m "jobs.$job" "$@")

    cd "$CLF_ROOT" || exit 2
    if [[ "${CLF_DRY_RUN:-}" == 1 ]]; then
        printf '%q ' "${submit[@]}"
        echo
        return 0
    fi
    clf_setup_cluster_env

    # Two jobs writing one --output would race; a retry waits until the earlier one is over.
    local running
    if ! running="$(clf_unfinished_jobs "$job" "$output")"; then
        echo "cluster/submit-$job.sh: error: cannot list jobs at $RAY_API_SERVER_ADDRESS" >&2
        exit 1
    fi
    if [[ -n "$running" ]]; then
        echo "cluster/submit-$job.sh: error: job(s) still running into --output $output:" \
            "$running; wait for them or stop them with: ray job stop ID" >&2
        exit 3
    fi

    trap 'echo; echo "interrupted: job $id keeps running on the cluster;" \
        "follow it with: ray job logs -f $id; stop it with: ray job stop $id" >&2; exit 130' INT TERM
    echo "submitting $id to $RAY_API_SERVER_ADDRESS"
    local rc=0
    "${submit[@]}" || rc=$?
    if [[ "${CLF_NO_WAIT:-}" == 1 ]]; then
        return "$rc"
    fi

    # `ray job submit` exits 0 for a STOPPED job too, and non-zero when only its log stream broke,
    # so the verdict comes from the job's status.
    local status failures=0
    while :; do
        if status="$(clf_job_status "$id")"; then
            failures=0
            case "$status" in SUCCEEDED | FAILED | STOPPED) break ;; esac
            echo "job $id is $status; waiting"
        else
            failures=$((failures + 1))
            if ((rc != 0 && failures == 1)) || ((failures >= 20)); then
                echo "cluster/submit-$job.sh: error: cannot read the status of job $id" >&2
                exit 1
            fi
        fi
        sleep "${CLF_POLL_SECONDS:-15}"
    done
    if [[ "$status" == SUCCEEDED ]]; then
        echo "job $id succeeded; output: $output"
        return 0
    fi
    echo "job $id $status. Re-run the same command to resume into $output" \
        "(logs: ray job logs $id)" >&2
    exit 1
}
