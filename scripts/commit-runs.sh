#!/usr/bin/env bash
# Commit each finished run of a `dynmole reproduce` results folder as it lands, so that a long grid
# (scripts/cpu-grid.sh) grows in git run by run. Only the run's result.json, predictions.json,
# log.jsonl and routing_probe.jsonl are committed (never checkpoints), with `git commit <paths>` so
# nothing else that is staged is swept in.
#   usage: scripts/commit-runs.sh DIR LABEL [DIR LABEL ...]   e.g. docs/results/cpu cpu-grid docs/results/cpu-label cpu-label
# Runs until killed; checks every ${INTERVAL:-120} seconds.
# tests/test_results_doc.py checks docs/results/cpu/results.md and the averages quoted in docs/results.md against
# the committed cpu runs: after a run lands, regenerate the report (--report-only) and update the doc before submitting.
set -u
cd "$(dirname "$0")/.."
(( $# >= 2 && $# % 2 == 0 )) || { echo "usage: $0 DIR LABEL [DIR LABEL ...]" >&2; exit 2; }
while true; do
  for ((i = 1; i < $#; i += 2)); do
    dir="${!i}"; j=$((i + 1)); label="${!j}"
    for result in $(find "$dir/runs" -name result.json 2>/dev/null | sort); do
      run=$(dirname "$result")
      git ls-files --error-unmatch "$result" >/dev/null 2>&1 && continue
      files=()
      for f in result.json predictions.json log.jsonl routing_probe.jsonl; do [ -f "$run/$f" ] && files+=("$run/$f"); done
      git add "${files[@]}" && git commit -q -m "$label: ${run#"$dir"/runs/} finished" "${files[@]}" && echo "committed $run $(date -u)"
    done
  done
  sleep "${INTERVAL:-120}"
done
