#!/usr/bin/env bash
# Point the real agent clients at a local `nemotron3 serve` and run one prompt each with their default
# settings: Codex CLI (npm @openai/codex, Responses API) and Claude Code (npm @anthropic-ai/claude-code,
# Anthropic Messages). Both are installed from npm into a temporary prefix; nothing is written outside it.
#
#   scripts/try_clients.sh [MODEL_DIR] [PROMPT]        (defaults: the embedded pico model, "say hi")
#
# Env: PORT (default: a free one), MAX_MODEL_LEN (default 65536: Claude Code's default request is a
# ~20K-token prompt with max_tokens 32000), KEEP=1 keeps the temporary directory (server log, client output).
# Prints each client's exit code and output; exits non-zero if either client failed.
set -u
MODEL=${1:-}
PROMPT=${2:-say hi}
TMP=$(mktemp -d)
PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
NAME=pico
KEY=local-key
SERVER_PID=

cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

echo "== installing @openai/codex and @anthropic-ai/claude-code into $TMP/npm"
npm install --silent --no-audit --no-fund --prefix "$TMP/npm" @openai/codex @anthropic-ai/claude-code \
  >"$TMP/npm.log" 2>&1 || { cat "$TMP/npm.log"; exit 1; }
BIN=$TMP/npm/node_modules/.bin
echo "codex $("$BIN/codex" --version 2>/dev/null | tail -1); claude $("$BIN/claude" --version 2>/dev/null | tail -1)"

echo "== starting nemotron3 serve on 127.0.0.1:$PORT"
nemotron3 serve ${MODEL:+"$MODEL"} --port "$PORT" --served-model-name "$NAME" --api-key "$KEY" \
  --max-model-len "${MAX_MODEL_LEN:-65536}" >"$TMP/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$TMP/server.log"; exit 1; }
  sleep 1
done

# ---------------------------------------------------------------- Codex CLI: a custom Responses provider
export CODEX_HOME=$TMP/codex
mkdir -p "$CODEX_HOME"
cat >"$CODEX_HOME/config.toml" <<EOF
model = "$NAME"
model_provider = "nemotron3"
model_context_window = ${MAX_MODEL_LEN:-65536}
check_for_update_on_startup = false

[model_providers.nemotron3]
name = "nemotron3"
base_url = "http://127.0.0.1:$PORT/v1"
wire_api = "responses"
env_key = "NEMOTRON3_API_KEY"

[analytics]
enabled = false

[feedback]
enabled = false
EOF
echo "== codex exec \"$PROMPT\"   (CODEX_HOME/config.toml:)"
sed 's/^/    /' "$CODEX_HOME/config.toml"
(cd "$TMP" && NEMOTRON3_API_KEY=$KEY timeout 600 "$BIN/codex" exec --skip-git-repo-check "$PROMPT" \
  </dev/null >"$TMP/codex.out" 2>&1)
CODEX_RC=$?
tail -n 40 "$TMP/codex.out"
echo "codex exit code: $CODEX_RC"

# ---------------------------------------------------------------- Claude Code: ANTHROPIC_BASE_URL
echo "== claude -p \"$PROMPT\""
(cd "$TMP" && HOME=$TMP/home ANTHROPIC_BASE_URL="http://127.0.0.1:$PORT" ANTHROPIC_API_KEY=$KEY \
  ANTHROPIC_MODEL=$NAME ANTHROPIC_SMALL_FAST_MODEL=$NAME DISABLE_TELEMETRY=1 DISABLE_AUTOUPDATER=1 \
  CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 timeout 900 "$BIN/claude" -p "$PROMPT" --output-format json \
  </dev/null >"$TMP/claude.out" 2>&1)
CLAUDE_RC=$?
tail -c 3000 "$TMP/claude.out"; echo
echo "claude exit code: $CLAUDE_RC"

echo "== server requests"
grep -E '"(POST|GET|HEAD|DELETE) ' "$TMP/server.log" | sed 's/^/    /' | tail -n 20
echo "codex: $CODEX_RC   claude: $CLAUDE_RC"
[ "$CODEX_RC" = 0 ] && [ "$CLAUDE_RC" = 0 ]
