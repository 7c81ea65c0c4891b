#!/bin/sh
# Entrypoint of the loopbot image (see deploy/Dockerfile): seeds /data, then runs `loopbot ARGS`.
#   loopbot-entrypoint run ...     the bot; webhook mode when LOOPBOT_WEBHOOK_URL is set
#   loopbot-entrypoint healthcheck exit 0 if /healthz answers 200 (the image's HEALTHCHECK)
#   loopbot-entrypoint backup ...  any other loopbot command
set -eu

if [ "${1:-}" = "healthcheck" ]; then
  exec python - <<'PY'
import os, sys, urllib.error, urllib.request
url = f"http://127.0.0.1:{os.environ.get('LOOPBOT_HEALTH_PORT', '9090')}/healthz"
try:
    with urllib.request.urlopen(url, timeout=8) as resp:
        sys.exit(0 if resp.status == 200 else 1)
except urllib.error.HTTPError as exc:  # 503 carries the reason: show it in `docker inspect`
    print(exc.read().decode(errors="replace").strip())
    sys.exit(1)
except OSError as exc:
    print(f"no answer from {url}: {exc}")
    sys.exit(1)
PY
fi

# Mined prompt candidates are written next to the shipped versions, so the folder lives on the
# volume; the shipped ones are copied in once (later image versions add new files only).
mkdir -p "${LOOPBOT_PROMPTS:-/data/prompts}" /data/models /data/backups
for f in /opt/loopbot/prompts/*.yaml; do
  [ -e "${LOOPBOT_PROMPTS:-/data/prompts}/$(basename "$f")" ] || \
    cp "$f" "${LOOPBOT_PROMPTS:-/data/prompts}/"
done

if [ "${1:-}" = "run" ] && [ -n "${LOOPBOT_WEBHOOK_URL:-}" ]; then
  set -- "$@" --webhook-url "$LOOPBOT_WEBHOOK_URL" \
    --listen "${LOOPBOT_WEBHOOK_LISTEN:-0.0.0.0:8443}"
fi
exec loopbot "$@"
