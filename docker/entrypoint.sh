#!/bin/sh
# Start `iotcls serve` (bridge + scorers) in the background; Zeek listens on the WebSocket
# port and the bridge connects to it, retrying until Zeek is up.
set -e
iotcls serve ${IOTCLS_CONFIG:+--config "$IOTCLS_CONFIG"} &
serve=$!
trap 'kill -TERM $serve 2>/dev/null; wait $serve' EXIT INT TERM
"$@"
