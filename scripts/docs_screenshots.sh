#!/usr/bin/env bash
# The monitoring page's screenshots, from a real run: the embedded default for 80 steps on a local
# Ray head, Prometheus (Debian's package) scraping it through Ray's own config, and headless
# Chromium (Debian's package) photographing Ray's dashboard and Prometheus' graphs into docs/img/.
# Needs `apt-get install prometheus chromium`. The local head runs without token authentication
# (RAY_AUTH_MODE=disabled) so the browser needs no token; it listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
for tool in prometheus chromium; do
  command -v "$tool" >/dev/null || { echo "docs_screenshots: needs $tool (apt-get install $tool)" >&2; exit 2; }
done
work=$(mktemp -d)
mkdir -p docs/img
[ -d runs/tiny-model ] || .venv/bin/grpo-dist make-tiny-model --out runs/tiny-model --warm-start
RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false .venv/bin/grpo-dist run deploy/configs/tiny_cpu.yaml \
  --set trainer.steps=80 --set trainer.eval_every=null --set checkpoint.save_every=null \
  --set checkpoint.save_at_end=false --set "trainer.output_dir=$work/run" >"$work/run.log" 2>&1 &
run=$!
trap 'kill $run 2>/dev/null || true; kill ${prom:-} 2>/dev/null || true' EXIT

# The dashboard's address is in the run's log once the head is up.
for _ in $(seq 180); do
  dash=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$work/run.log" | head -1 || true)
  [ -n "$dash" ] && [ -f /tmp/ray/session_latest/metrics/prometheus/prometheus.yml ] && break
  sleep 1
done
[ -n "$dash" ] || { tail -20 "$work/run.log" >&2; echo "docs_screenshots: no dashboard address after 180 s" >&2; exit 1; }
prometheus --config.file=/tmp/ray/session_latest/metrics/prometheus/prometheus.yml \
  --storage.tsdb.path="$work/prom" --web.listen-address=127.0.0.1:9090 >"$work/prom.log" 2>&1 &
prom=$!

# Let the run get well into training, then photograph while it still runs.
for _ in $(seq 900); do
  [ -f "$work/run/metrics.jsonl" ] && [ "$(wc -l <"$work/run/metrics.jsonl")" -ge 75 ] && break
  sleep 1
done
shot() {  # shot FILE URL [HEIGHT]
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="1400,${3:-860}" \
    --virtual-time-budget=15000 --screenshot="docs/img/$1" "$2" >/dev/null 2>&1
  echo "docs/img/$1 <- $2"
}
graph() {  # Prometheus' graph of one expression over the last 90 s (what it has scraped since it found the run)
  echo "http://127.0.0.1:9090/graph?g0.expr=$1&g0.tab=0&g0.range_input=90s"
}
shot ray-dashboard-actors.png "$dash/#/actors"
shot ray-dashboard-overview.png "$dash/#/overview"
shot prometheus-reward.png "$(graph ray_grpo_reward_mean)" 900
shot prometheus-weight-version.png "$(graph ray_grpo_worker_weight_version)" 900
wait $run
