#!/bin/sh
# fairfront container entrypoint.
#   worker     run_study.py optimize on this container's GPUs (one worker process per GPU)
#   prepare    run_study.py prepare (caches, Stage 1) without starting workers
#   dashboard  run_study.py dashboard on 0.0.0.0:8080 (compose publishes it on 127.0.0.1 only)
#   anything else is executed as given (e.g. `bash`, `python run_study.py show ...`).
# Settings come from the environment (docker/.env): FAIRFRONT_STUDY (a study YAML in the image or
# under a mounted folder), FAIRFRONT_STORAGE (the database URL, with its password: it is passed on
# as the reference '${FAIRFRONT_STORAGE}', so it never appears in a process list or a log),
# FAIRFRONT_WORKERS (default: the number of visible GPUs, 1 without), FAIRFRONT_OPTIMIZE_ARGS
# (extra optimize options, e.g. "--n-trials 200 --timeout 86400").
# FAIRFRONT_DRY_RUN=1 prints the run_study.py arguments as JSON instead of running them (tests).
set -eu

study="${FAIRFRONT_STUDY:-studies/demo.yaml}"

run_study() {
    if [ -n "${FAIRFRONT_DRY_RUN:-}" ]; then
        python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' run_study.py "$@"
        exit 0
    fi
    exec python run_study.py "$@"
}

command="${1:-worker}"
case "$command" in
    worker)
        workers="${FAIRFRONT_WORKERS:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
        # shellcheck disable=SC2086  # FAIRFRONT_OPTIMIZE_ARGS is a list of options on purpose
        run_study -q optimize --study "$study" --storage '${FAIRFRONT_STORAGE}' --workers "$workers" ${FAIRFRONT_OPTIMIZE_ARGS:-}
        ;;
    prepare)
        run_study -q prepare --study "$study"
        ;;
    dashboard)
        run_study dashboard --study "$study" --storage '${FAIRFRONT_STORAGE}' --host 0.0.0.0 --port 8080
        ;;
    *)
        exec "$@"
        ;;
esac
