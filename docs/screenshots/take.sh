#!/usr/bin/env bash
# Re-take the screenshots in this folder: a real `prefect server start` with its UI, one small
# `loraflow run` against it, then headless Chromium (`apt-get install chromium`) on the flow run's
# page and on each artifact's page. Run from the repository root with the venv installed.
set -euo pipefail
out="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
source .venv/bin/activate
export PREFECT_HOME="$work/prefect" PREFECT_SERVER_ANALYTICS_ENABLED=false
prefect server start --host 127.0.0.1 --port 4200 --no-scheduler > "$work/server.log" 2>&1 &
server=$!
trap 'kill $server' EXIT
for _ in $(seq 1 120); do curl -sf http://127.0.0.1:4200/api/health > /dev/null && break; sleep 1; done
export PREFECT_API_URL=http://127.0.0.1:4200/api
loraflow run --set train.steps=60 --set train.checkpoint_every=20 --set "sample.checkpoints=[20, 40]" \
  --set sample.steps=4 --set store="$work/store" --report "$work/report.json"
run=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['flow_run_id'])" "$work/report.json")
shot() { chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1500,1100 \
           --virtual-time-budget=30000 --screenshot="$out/$1.png" "http://127.0.0.1:4200/$2" 2> /dev/null; }
shot flow-run "runs/flow-run/$run"
python - "$run" <<'PY' | while read -r key id; do shot "artifact-${key#loraflow-}" "artifacts/artifact/$id"; done
import sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
with get_client(sync_client=True) as client:
    for a in client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[sys.argv[1]]))):
        if a.key in ("loraflow-samples", "loraflow-loss-curve", "loraflow-stages", "loraflow-train-progress"):
            print(a.key, a.id)
PY
