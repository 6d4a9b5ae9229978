#!/usr/bin/env bash
# relaybot vs n8n 1.123.x on this machine, with the same load generator (the n8n harness's loadgen.py + wrk,
# same ~2 KB pull_request "opened" body, same probes), then one table and the issue-7 targets, PASS/FAIL.
#
#   bash bench/compare_n8n.sh                              # full: 20 s windows, 10,000 waiting runs
#   DURATION=3 WARMUP=1 RATE_DURATION=3 WAITING=1000 SMOKE=1 bash bench/compare_n8n.sh    # a smoke run
#   PG=1 bash bench/compare_n8n.sh                         # + PostgreSQL, one and two relaybot processes
#   WORKERS=2 bash bench/compare_n8n.sh                    # + SQLite with `relaybot serve --workers 2`
#
# Steps, one after the other (never both systems at once):
#   1. n8n: the harness's own run.sh (installs n8n from npm with its pinned lockfile into $BENCH_ROOT the first
#      time, ~3 min / 1.6 GB; fake Slack on 127.0.0.1:8765, n8n on 127.0.0.1:5678; those ports must be free).
#   2. relaybot, SQLite, one process: bench/relaybot_bench.py (random loopback ports) — the same levels, plus a
#      fixed-rate phase (RATE req/s, open loop) and a fresh bot with WAITING runs waiting for approval.
#   3. (PG=1) relaybot on PostgreSQL (a new database on 127.0.0.1:5432, dropped afterwards), one process and
#      two processes behind wrk's per-thread round-robin; PG_PAIRS=N runs that pair N times, one after the
#      other, and the target is judged on the median of the N ratios (the machine's speed drifts). Odd pairs
#      run one process first, even pairs two processes first: whatever a run leaves behind for the next one
#      (PostgreSQL's checkpoint of its WAL, dirty pages, a warmer cache) then favours neither side.
#   4. bench/compare_report.py: the table and the targets.
#
# Knobs (env): LEVELS=1,16,64 REPEATS=1 DURATION=20 WARMUP=5 PROBE_RATE=2 RATE=200 RATE_DURATION=20
#   WAITING=10000 WORKERS=1 PG=0 PG_LEVELS=16,64 PG_PAIRS=1 SMOKE=0 SKIP_N8N=0 N8N_RESULTS=<results.json of an earlier n8n run>
#   BENCH_ROOT=/tmp/n8nbench N8N_HARNESS=/work/shared/bench/n8n PY=<project venv python> PROFILE=0 SOURCE=<dir>
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
HARNESS=${N8N_HARNESS:-/work/shared/bench/n8n}
export BENCH_ROOT=${BENCH_ROOT:-/tmp/n8nbench}
LEVELS=${LEVELS:-1,16,64}
REPEATS=${REPEATS:-1}
DURATION=${DURATION:-20}
WARMUP=${WARMUP:-5}
PROBE_RATE=${PROBE_RATE:-2}
RATE=${RATE:-200}
RATE_DURATION=${RATE_DURATION:-20}
WAITING=${WAITING:-10000}
PG=${PG:-0}
PG_LEVELS=${PG_LEVELS:-16,64}
PG_PAIRS=${PG_PAIRS:-1}
SMOKE=${SMOKE:-0}
SKIP_N8N=${SKIP_N8N:-0}
PROFILE=${PROFILE:-0}
PY=${PY:-$ROOT/.venv/bin/python}
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-$BENCH_ROOT/compare/$STAMP}
mkdir -p "$OUT"
log() { printf '[compare_n8n %s] %s\n' "$(date +%T)" "$*" >&2; }

command -v wrk >/dev/null || { log "installing wrk from Debian"; apt-get install -y -qq wrk >/dev/null; }
"$PY" -c 'import bot' 2>/dev/null || { log "$PY cannot import bot: use the project venv (pip install -e .)"; exit 1; }

{
  echo "date: $(date -Is)"
  echo "host: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(uname -r)"
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "busiest processes before:"; ps -eo pid,pcpu,etime,args --sort=-pcpu | head -6 | cut -c1-150
} | tee "$OUT/machine.txt" >&2

# ------------------------------------------------------------------ 1. n8n (the harness's run.sh)
N8N_JSON=${N8N_RESULTS:-}
if [ "$SKIP_N8N" != 1 ] && [ -z "$N8N_JSON" ]; then
  label="cmp-$STAMP-n8n"
  log "n8n: $HARNESS/run.sh (levels $LEVELS, ${DURATION}s windows, ${WARMUP}s warm-up, $REPEATS repeat(s))"
  LABEL=$label LEVELS=$LEVELS REPEATS=$REPEATS DURATION=$DURATION WARMUP=$WARMUP PROBE_RATE=$PROBE_RATE \
    bash "$HARNESS/run.sh" > "$OUT/n8n-run.out" 2>&1 || { log "n8n run.sh failed:"; tail -30 "$OUT/n8n-run.out"; exit 1; }
  N8N_JSON=$(ls -d "$BENCH_ROOT"/runs/*-"$label" | tail -1)/results.json
  sed -n '/================ n8n/,$p' "$OUT/n8n-run.out" | head -12 >&2
fi

# ------------------------------------------------------------------ 2. relaybot, SQLite, one process
common=(--repeats "$REPEATS" --duration "$DURATION" --warmup "$WARMUP" --probe-rate "$PROBE_RATE" --harness "$HARNESS")
# SOURCE=<dir>: benchmark that source tree (e.g. `git archive HEAD | tar -x -C /tmp/relaybot-head`) instead of the
# working tree, which other people may be editing.
[ -n "${SOURCE:-}" ] && common+=(--source "$SOURCE")
profile=()
if [ "$PROFILE" = 1 ]; then
  pyspy=$(command -v py-spy || echo "$BENCH_ROOT/pyspy-venv/bin/py-spy")
  if [ ! -x "$pyspy" ]; then python3 -m venv "$BENCH_ROOT/pyspy-venv" && "$BENCH_ROOT/pyspy-venv/bin/pip" install -q py-spy; fi
  profile=(--profile "$OUT/relaybot-profile.txt" --py-spy "$pyspy")
fi
log "relaybot: SQLite, one process (levels $LEVELS, fixed rate $RATE req/s for ${RATE_DURATION}s, $WAITING waiting runs)"
(cd "$ROOT" && "$PY" "$HERE/relaybot_bench.py" --levels "$LEVELS" "${common[@]}" --rate "$RATE" \
  --rate-duration "$RATE_DURATION" --waiting "$WAITING" "${profile[@]}" --out "$OUT/relaybot.json") \
  2>"$OUT/relaybot.err" | tee "$OUT/relaybot.out" >&2 || { log "relaybot bench failed:"; tail -30 "$OUT/relaybot.err"; exit 1; }

# ------------------------------------------------------------------ 2b. relaybot, SQLite, serve --workers (optional)
WORKERS=${WORKERS:-1}
workers_args=()
if [ "$WORKERS" -gt 1 ]; then
  log "relaybot: SQLite, serve --workers $WORKERS (levels $LEVELS)"
  (cd "$ROOT" && "$PY" "$HERE/relaybot_bench.py" --workers "$WORKERS" --levels "$LEVELS" "${common[@]}" --rate 0 \
    --label "relaybot-w$WORKERS" --out "$OUT/relaybot-workers.json") \
    2>"$OUT/relaybot-workers.err" | tee "$OUT/relaybot-workers.out" >&2 \
    && workers_args=(--workers "$OUT/relaybot-workers.json") \
    || { log "relaybot with --workers $WORKERS failed:"; tail -15 "$OUT/relaybot-workers.err" >&2; }
fi

# ------------------------------------------------------------------ 3. relaybot on PostgreSQL (optional)
pg_args=()
if [ "$PG" = 1 ]; then
  for pair in $(seq "$PG_PAIRS"); do
    order="1 2"
    [ $((pair % 2)) = 0 ] && order="2 1"
    for n in $order; do
      log "relaybot: PostgreSQL, $n process(es) (levels $PG_LEVELS, pair $pair of $PG_PAIRS)"
      name=relaybot-pg$n-$pair
      if (cd "$ROOT" && "$PY" "$HERE/relaybot_bench.py" --db postgres --processes "$n" --levels "$PG_LEVELS" \
            "${common[@]}" --rate 0 --label "relaybot-pg$n" --out "$OUT/$name.json") \
            2>"$OUT/$name.err" | tee "$OUT/$name.out" >&2; then
        pg_args+=(--pg$n "$OUT/$name.json")
      else
        log "relaybot on PostgreSQL ($n process(es)) FAILED — relaybot does not (yet) run there; the tail of its log:"
        tail -15 "$OUT/$name.err" >&2
        pg_args=(--pg-error "$OUT/$name.err")
        break 2
      fi
    done
  done
fi

# ------------------------------------------------------------------ 4. the table
report=(--relaybot "$OUT/relaybot.json" "${workers_args[@]}" "${pg_args[@]}")
[ -n "$N8N_JSON" ] && report+=(--n8n "$N8N_JSON")
[ "$SMOKE" = 1 ] && report+=(--smoke)
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine.txt"
{ cat "$OUT/machine.txt"; echo; "$PY" "$HERE/compare_report.py" "${report[@]}"; } | tee "$OUT/report.txt"
log "everything is in $OUT"
