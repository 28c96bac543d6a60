#!/usr/bin/env bash
# The README's "Operating it" commands, in order, on a one-node `ray start` cluster: start, deploy,
# wait until ready, status, one request, the metrics an operator scrapes, logs, stop.
# .ci/run runs this, so every command the README shows an operator keeps working.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=token  # Ray >= 2.59 enables token auth; the CLI must be told to use it
METRICS_PORT=${METRICS_PORT:-8080}
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT

ray start --head --dashboard-host 127.0.0.1 --metrics-export-port "$METRICS_PORT" \
  --disable-usage-stats
serve deploy serve_config.yaml
for _ in $(seq 1 90); do
  curl -sf http://127.0.0.1:8000/readyz >/dev/null && break
  sleep 2
done
curl -sf http://127.0.0.1:8000/readyz
echo
serve status | tee /tmp/serve_status.txt
grep -q "status: RUNNING" /tmp/serve_status.txt
curl -sf http://127.0.0.1:8000/v1/generate -H 'content-type: application/json' \
  -d '{"model": "tiny", "prompt": "a photo of a cat", "seed": 1}' | head -c 120
echo
# Ray exports every deployment's metrics (ours carry a `ray_` prefix) in Prometheus format.
for _ in $(seq 1 30); do
  curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" | grep -q "^ray_sdxl_steps" && break
  sleep 2
done
curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" | grep -E "^ray_(sdxl_steps|model_cache_bytes)" \
  | head -4
ls /tmp/ray/session_latest/logs/serve/ | grep -q "SDXLPipeline"
serve shutdown -y
