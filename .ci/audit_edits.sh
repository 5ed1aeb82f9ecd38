#!/usr/bin/env bash
# The ten hand edits of the test audit (docs/testing.md), each applied alone to a scratch copy of HEAD:
# every one must make the tests that guard it fail. Prints "caught" or "SURVIVED" per edit and exits 1 if
# any survived. The checkout is never modified. Usage: bash .ci/audit_edits.sh   (about 2 minutes)
set -u
root="$(cd "$(dirname "$0")/.." && pwd)"
pytest="$root/.venv/bin/pytest"
[ -x "$pytest" ] || { echo "no $pytest: run the README's test command first"; exit 2; }
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
git -C "$root" archive HEAD | tar -x -C "$scratch"
cd "$scratch"
survived=0

edit() {  # name file old new tests...
  local name=$1 file=$2 old=$3 new=$4; shift 4
  cp "$file" "$scratch/.orig"
  python3 - "$file" "$old" "$new" <<'PY'
import sys
path, old, new = sys.argv[1:4]
text = open(path).read()
if text.count(old) != 1:
    sys.exit(f"{path}: the line to edit is not there once ({text.count(old)} times): update .ci/audit_edits.sh")
open(path, "w").write(text.replace(old, new))
PY
  [ $? = 0 ] || { survived=1; return; }
  if PYTHONPATH="$scratch" "$pytest" -q -x -p no:cacheprovider "$@" >"$scratch/.log" 2>&1; then
    echo "SURVIVED $name"
    survived=1
  else
    echo "caught   $name: $(grep -m1 '^FAILED' "$scratch/.log" | cut -c1-140)"
  fi
  cp "$scratch/.orig" "$file"
}

edit protocol-capacity-rule shared/protocol.py \
  'self._active >= self.capacity - 1' 'self._active > self.capacity - 1' tests/unit/test_protocol.py
edit metrics-eta-cap-at-T shared/metrics.py \
  'max(0, min(iv.end, total) - iv.start)' 'max(0, iv.end - iv.start)' tests/unit/test_metrics.py
edit metrics-negative-tokens shared/metrics.py \
  'if self.tokens < 0:' 'if self.tokens < -1:' tests/unit/test_metrics.py
edit rewards-format-error-check shared/rewards.py \
  'self.format_error_reward >= 0:' 'self.format_error_reward > 0:' tests/unit/test_rewards.py
edit countdown-max-numbers shared/tasks/countdown.py \
  'not 1 <= len(numbers) <= MAX_NUMBERS' 'not 1 <= len(numbers)' tests/unit/tasks/test_countdown.py
edit countdown-scores-n-plus-1 shared/tasks/countdown.py \
  'for text in exprs[:n_solutions]:' 'for text in exprs[:n_solutions + 1]:' tests/unit/tasks/test_countdown.py
edit organizer-malformed-not-acked services/organizer/service.py \
  $'malformed submission %s: %s", entry.id, exc)\n            await self._ack(entry.id)\n' \
  $'malformed submission %s: %s", entry.id, exc)\n' tests/unit/organizer/test_service.py
edit organizer-invalid-not-acked services/organizer/service.py \
  $'submission.episode_id, exc)\n            await self._ack(entry.id)\n' \
  $'submission.episode_id, exc)\n' tests/unit/organizer/test_service.py
edit organizer-finished-runs-again services/organizer/service.py \
  'if before is not None and before.finished:' 'if before is not None and before.finished and False:' \
  tests/unit/organizer/test_service.py
edit engine-wrong-capacity-to-reward shared/engine.py \
  $'            eta=eta,\n            capacity=self.capacity,\n' \
  $'            eta=eta,\n            capacity=self.capacity + 1,\n' tests/unit/engine
exit "$survived"
