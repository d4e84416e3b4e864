#!/usr/bin/env bash
# The test command. On a machine with only node and npm it installs what the
# tests need (Bun and the dev dependencies, pinned in package-lock.json), then
# runs every suite in its own process and ends with "N passed, N failed".
# Suites that need chromium, promtool or openssl skip without them, unless
# CI=true, where a missing binary is a failure (.ci/run installs them).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ ! -x node_modules/.bin/bun ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
# npm may be set to skip install scripts; Bun's places its platform binary.
node_modules/.bin/bun --version >/dev/null 2>&1 || (cd node_modules/bun && node install.js)
export PATH="$PWD/node_modules/.bin:$PATH"
echo "bun $(bun --version), node $(node --version)"

passed=0
failed=0
logs=$(mktemp -d)

# Adds a suite's counts from Bun's summary; a suite that died before printing one counts as a failure.
count() {
  local log=$1 p f
  p=$(grep -aE '^ *[0-9]+ pass$' "$log" | tail -1 | grep -oE '[0-9]+')
  f=$(grep -aE '^ *[0-9]+ fail$' "$log" | tail -1 | grep -oE '[0-9]+')
  if [ -z "$p" ] && [ -z "$f" ]; then f=1; p=0; fi
  passed=$((passed + ${p:-0}))
  failed=$((failed + ${f:-0}))
}

run_suite() {
  local name=$1; shift
  local log="$logs/$(echo "$name" | tr '/ ' '__').log"
  echo "=== $name"
  "$@" >"$log" 2>&1
  grep -avE '^\(pass\)' "$log" | tail -40
  count "$log"
}

echo "=== typecheck (tsc --noEmit)"
if tsc --noEmit; then passed=$((passed + 1)); else failed=$((failed + 1)); fi

shopt -s nullglob
for suite in server.test.ts test/*.test.ts; do
  run_suite "$suite" bun test --timeout 60000 "./$suite"
done

# live.test.ts is black-box: run it against a relay started the way the README says.
live_log="$logs/live-relay.log"
PORT=0 HOST=127.0.0.1 LOG_LEVEL=info bun run server.ts >"$live_log" 2>&1 &
relay_pid=$!
for _ in $(seq 1 100); do grep -q '"event":"start"' "$live_log" && break; sleep 0.1; done
live_port=$(grep -aom1 '"port":[0-9]*' "$live_log" | grep -oE '[0-9]+')
LIVE_URL="http://127.0.0.1:${live_port:-1}" run_suite "live.test.ts (against bun run server.ts)" bun test --timeout 60000 ./live.test.ts
kill -TERM "$relay_pid" 2>/dev/null
wait "$relay_pid"
rc=$?
echo "=== relay exit after SIGTERM: $rc"
if [ "$rc" -eq 0 ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi

rm -rf "$logs"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
