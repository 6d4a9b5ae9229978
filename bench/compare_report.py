#!/usr/bin/env python3
"""One table for relaybot and n8n measured by the same load generator, and the issue-7 targets, PASS/FAIL.

    python bench/compare_report.py --n8n RUN_DIR/results.json --relaybot relaybot.json \
        [--pg1 relaybot-pg1.json --pg2 relaybot-pg2.json ...] [--pg-error pg.log] [--smoke]

`--n8n` is the `results.json` that the n8n harness's run.sh (loadgen.py) writes; the relaybot files are
`bench/relaybot_bench.py --out`. `--pg1`/`--pg2` may be given several times: pairs run one after the other
(the machine's speed drifts by 15-30 % from minute to minute); the PostgreSQL target is then judged on the median
of the pairs' ratios, and every pair is shown. Reading files only: no network.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relaybot_bench import level_summary

TARGET_ACCEPT_RATIO = 20.0
TARGET_CARDS_RATIO = 10.0
TARGET_ACCEPT_P99_MS = 50.0
TARGET_E2E_P99_MS = 100.0
TARGET_RSS_MB = 200.0
TARGET_WAITING_MB = 50.0
TARGET_WAITING_RUNS = 10_000
TARGET_PG_RATIO = 1.6
FIXED_RATE = 200.0


def load(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    with open(path) as handle:
        return dict(json.load(handle))


def by_level(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Mean of the repeats at each connection level."""
    grouped: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(row["conns"], []).append(row)
    result = {}
    for conns, group in sorted(grouped.items()):
        merged: dict[str, Any] = {"conns": conns, "reps": len(group)}
        for key in ("accepted_rps", "accept_p50_ms", "accept_p99_ms", "e2e_p50_ms", "e2e_p99_ms",
                    "cards_per_s_window", "cards_per_s_sustained", "cpu_pct", "busy_pct", "rss_after_mb"):
            values = [row[key] for row in group if row.get(key) is not None]
            merged[key] = statistics.fmean(values) if values else None
        merged["missing"] = sum(row["missing"] for row in group)
        merged["errors"] = sum(row["errors"] for row in group)
        result[conns] = merged
    return result


def n8n_levels(data: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return by_level([level_summary(row) for row in data["rows"]])


def relaybot_levels(data: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return by_level(data.get("levels") or [])


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(systems: list[tuple[str, dict[int, dict[str, Any]], float | None]]) -> list[str]:
    header = ["system", "conns", "accepted/s", "acc p50 ms", "acc p99 ms", "cards/s sust", "cards/s win",
              "card p50 ms", "card p99 ms", "missing", "errs", "CPU%", "busy%", "RSS MB"]
    widths = [28, 5, 10, 10, 10, 12, 11, 11, 11, 7, 5, 5, 5, 7]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True)))]
    for name, levels, rss_end in systems:
        for conns, row in levels.items():
            values = [name, conns, fmt(row["accepted_rps"]), fmt(row["accept_p50_ms"]), fmt(row["accept_p99_ms"]),
                      fmt(row["cards_per_s_sustained"]), fmt(row["cards_per_s_window"]), fmt(row["e2e_p50_ms"], 0),
                      fmt(row["e2e_p99_ms"], 0), row["missing"], row["errors"], fmt(row["cpu_pct"], 0),
                      fmt(row["busy_pct"], 0), fmt(row["rss_after_mb"], 0)]
            lines.append("  ".join(str(v).rjust(w) if i else str(v).ljust(w)
                                   for i, (v, w) in enumerate(zip(values, widths, strict=True))))
        if rss_end is not None:
            lines.append(f"{'':28}  RSS at the end of the run: {rss_end:.0f} MB")
    return lines


def _machine_ms(run: dict[str, Any], level: int) -> float | None:
    values = [row["cpu_ms_per_card"]["machine"] for row in run.get("levels") or []
              if row["conns"] == level and row.get("cpu_ms_per_card", {}).get("machine")]
    return statistics.fmean(values) if values else None


def machine_ceiling(one_process: dict[str, Any], two_processes: dict[str, Any], level: int, cards_per_s: float,
                    two_cards_per_s: float) -> str:
    """What the machine could post at all if every core were busy at the one-process run's CPU per card (the
    bots', PostgreSQL's, the fake Slack's and the load generator's together): no number of processes on this
    machine can beat that ratio, however well they share the work. Then what the two-process run itself cost per
    card, against that: whether the ceiling or the cost of two processes held it back."""
    one_ms, two_ms = _machine_ms(one_process, level), _machine_ms(two_processes, level)
    cores = (one_process.get("host") or {}).get("nproc")
    if not one_ms or not cores or not cards_per_s:
        return ""
    ceiling = 1000.0 * cores / one_ms
    text = (f"; this machine's ceiling at the 1-process run's {one_ms:.2f} ms of CPU per card ({cores} cores all "
            f"busy): {ceiling:.0f} cards/s = {ceiling / cards_per_s:.2f}×")
    if two_ms:
        text += (f"; 2 processes: {two_ms:.2f} ms per card ({100.0 * (two_ms / one_ms - 1):+.0f} %), "
                 f"{100.0 * two_cards_per_s / ceiling:.0f} % of the ceiling")
    return text


def pg_check(pairs: list[tuple[Any, Any]]) -> tuple[str, str, bool | None]:
    """Two processes against one on PostgreSQL, at the highest level both ran: each pair's ratio; with several
    pairs the verdict is on their median (and no pair may leave a card missing)."""
    ratios, details, missing = [], [], 0
    level = None
    for pg1, pg2 in pairs:
        one, two = relaybot_levels(pg1), relaybot_levels(pg2)
        level = max(set(one) & set(two)) if set(one) & set(two) else None
        if level is None:
            return ("PostgreSQL: 2 processes vs 1", "no level that both runs measured", None)
        a, b = one[level]["cards_per_s_sustained"], two[level]["cards_per_s_sustained"]
        ratio = b / a if a else None
        missing += two[level]["missing"]
        if ratio is not None:
            ratios.append(ratio)
        details.append(f"{b:.1f} vs {a:.1f} → {fmt(ratio, 2)}×" + machine_ceiling(pg1, pg2, level, a, b))
    name = f"PostgreSQL: 2 processes ≥ {TARGET_PG_RATIO:g}× 1 process cards/s ({level} conns)"
    if not ratios:
        return (name, "; ".join(details), None)
    judged = statistics.median(ratios)
    if len(pairs) == 1:
        detail = f"{details[0]}, missing {missing}"
    else:
        detail = (f"median of {len(pairs)} pairs {judged:.2f}× (" + ", ".join(f"{r:.2f}×" for r in ratios)
                  + f"), missing {missing}; " + " | ".join(f"pair {i}: {d}" for i, d in enumerate(details, start=1)))
    return (name, detail, judged >= TARGET_PG_RATIO and missing == 0)


def verdict(ok: bool | None) -> str:
    return "n/a " if ok is None else ("PASS" if ok else "FAIL")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n8n", help="results.json of the n8n harness run")
    parser.add_argument("--relaybot", required=True, help="relaybot_bench.py --out (SQLite, one process)")
    parser.add_argument("--pg1", action="append", default=[],
                        help="relaybot_bench.py --out, PostgreSQL, one process (repeatable: one per pair)")
    parser.add_argument("--pg2", action="append", default=[],
                        help="relaybot_bench.py --out, PostgreSQL, two processes (repeatable, in the same order)")
    parser.add_argument("--workers", help="relaybot_bench.py --out, SQLite, `serve --workers N` (one host)")
    parser.add_argument("--pg-error", help="a file whose tail explains why the PostgreSQL mode failed")
    parser.add_argument("--smoke", action="store_true", help="label the numbers as a short smoke run")
    args = parser.parse_args()

    n8n = load(args.n8n)
    relay = load(args.relaybot)
    assert relay is not None
    if len(args.pg1) != len(args.pg2):
        parser.error("--pg1 and --pg2 come in pairs")
    pairs = [(load(one), load(two)) for one, two in zip(args.pg1, args.pg2, strict=True)]
    n8n_rows = n8n_levels(n8n) if n8n else {}
    relay_rows = relaybot_levels(relay)

    systems: list[tuple[str, dict[int, dict[str, Any]], float | None]] = []
    if n8n:
        systems.append(("n8n 1.123.x (SQLite)", n8n_rows, n8n.get("rss_end_mb")))
    systems.append(("relaybot (SQLite, 1 proc)", relay_rows, relay.get("rss_end_mb")))
    workers = load(args.workers)
    if workers:
        systems.append((f"relaybot (SQLite, serve --workers {workers.get('workers')})", relaybot_levels(workers),
                        workers.get("rss_end_mb")))
    for index, (pg1, pg2) in enumerate(pairs, start=1):
        pair = f", pair {index}" if len(pairs) > 1 else ""
        assert pg1 is not None and pg2 is not None
        systems.append((f"relaybot (PostgreSQL, 1 proc{pair})", relaybot_levels(pg1), pg1.get("rss_end_mb")))
        systems.append((f"relaybot (PostgreSQL, 2 procs{pair})", relaybot_levels(pg2), pg2.get("rss_end_mb")))

    kind = "SMOKE RUN (short windows; not a measurement)" if args.smoke else "measurement"
    print(f"=== relaybot vs n8n, same load generator (n8n harness loadgen.py + wrk), {kind}")
    print(f"relaybot run {relay.get('date')}; load average at start {relay['host'].get('loadavg_start')}, "
          f"at end {relay['host'].get('loadavg_end')}; {relay['host'].get('nproc')} cores")
    if n8n:
        print(f"n8n run: load average at end {n8n.get('host', {}).get('loadavg_end')}")
    print()
    for line in table(systems):
        print(line)
    print()
    print("accepted/s = HTTP 2xx answers per second (relaybot: 202 after the event is stored durably); acc p50/p99 ="
          " wrk latency;\ncards/s sust = cards at the fake Slack ÷ (load start → last card), the backlog included;"
          " cards/s win = cards\nduring the window; card p50/p99 = webhook → card chat.postMessage of timestamped"
          " probes; missing = accepted\nwebhooks without a card after the drain.")

    # ------------------------------------------------------------------ targets
    print()
    print("=== issue 7 targets")
    top = max(relay_rows) if relay_rows else None
    checks: list[tuple[str, str, bool | None]] = []
    if top is not None and n8n_rows and top in n8n_rows:
        r, n = relay_rows[top], n8n_rows[top]
        ratio = r["accepted_rps"] / n["accepted_rps"] if n["accepted_rps"] else None
        checks.append((f"accepted webhooks/s at {top} conns ≥ {TARGET_ACCEPT_RATIO:g}× n8n",
                       f"{r['accepted_rps']:.1f} vs {n['accepted_rps']:.1f} → {fmt(ratio, 2)}×",
                       None if ratio is None else ratio >= TARGET_ACCEPT_RATIO))
        ratio = r["cards_per_s_sustained"] / n["cards_per_s_sustained"] if n["cards_per_s_sustained"] else None
        checks.append((f"cards/s sustained at {top} conns ≥ {TARGET_CARDS_RATIO:g}× n8n, none missing",
                       f"{r['cards_per_s_sustained']:.1f} vs {n['cards_per_s_sustained']:.1f} → {fmt(ratio, 2)}×, "
                       f"missing {r['missing']}",
                       None if ratio is None else ratio >= TARGET_CARDS_RATIO and r["missing"] == 0))
        if workers and top in relaybot_levels(workers):
            w = relaybot_levels(workers)[top]
            ratio = w["cards_per_s_sustained"] / n["cards_per_s_sustained"] if n["cards_per_s_sustained"] else None
            checks.append((f"  the same with serve --workers {workers.get('workers')} (SQLite, one host)",
                           f"{w['cards_per_s_sustained']:.1f} vs {n['cards_per_s_sustained']:.1f} → "
                           f"{fmt(ratio, 2)}×, missing {w['missing']}",
                           None if ratio is None else ratio >= TARGET_CARDS_RATIO and w["missing"] == 0))
    else:
        checks.append(("ratios to n8n", "no n8n results in this run", None))
    fixed = relay.get("fixed_rate")
    if fixed:
        reached = fixed["achieved_rps"] >= 0.95 * fixed["rate"]
        note = "" if reached else f" (the generator reached only {fixed['achieved_rps']} req/s)"
        at = f"at {fixed['rate']:g} req/s for {fixed['duration_s']:g} s{note}"
        judged = fixed["rate"] == FIXED_RATE  # the target is stated at 200 req/s; other rates are informative
        accept_ok = None if fixed["accept_p99_ms"] is None or not judged else (
            fixed["accept_p99_ms"] <= TARGET_ACCEPT_P99_MS)
        e2e_ok = None if fixed["e2e_p99_ms"] is None or not judged else (
            fixed["e2e_p99_ms"] <= TARGET_E2E_P99_MS and fixed["cards"] >= fixed["accepted"])
        checks.append((f"p99 accept ≤ {TARGET_ACCEPT_P99_MS:g} ms at {FIXED_RATE:g} req/s",
                       f"{fmt(fixed['accept_p99_ms'])} ms {at}", accept_ok))
        checks.append((f"p99 webhook → card ≤ {TARGET_E2E_P99_MS:g} ms at {FIXED_RATE:g} req/s",
                       f"{fmt(fixed['e2e_p99_ms'])} ms {at}; cards {fixed['cards']}/{fixed['accepted']}", e2e_ok))
    else:
        checks.append((f"p99 accept / webhook → card at {FIXED_RATE:g} req/s", "not run", None))
    rss_end = relay.get("rss_end_mb")
    checks.append((f"RSS after the benchmark ≤ {TARGET_RSS_MB:g} MB", f"{fmt(rss_end)} MB",
                   None if rss_end is None else rss_end <= TARGET_RSS_MB))
    waiting = relay.get("waiting")
    if waiting:
        runs = waiting["runs"]
        added = waiting["rss_added_mb"]
        scaled = added * TARGET_WAITING_RUNS / runs if runs else None
        detail = f"+{added:.1f} MB for {runs} runs ({waiting['rss_before_mb']} → {waiting['rss_after_mb']} MB)"
        if runs != TARGET_WAITING_RUNS:
            detail += f"; scaled to {TARGET_WAITING_RUNS}: +{fmt(scaled)} MB (judged on the scaled value)"
        ok = scaled is not None and scaled <= TARGET_WAITING_MB and waiting.get("drained", False)
        if not waiting.get("drained", False):
            detail += "; NOT all cards posted"
        checks.append((f"{TARGET_WAITING_RUNS:,} runs waiting for approval add ≤ {TARGET_WAITING_MB:g} MB", detail, ok))
    else:
        checks.append(("runs waiting for approval add ≤ 50 MB", "not run", None))
    if pairs:
        checks.append(pg_check(pairs))
    elif args.pg_error:
        tail = Path(args.pg_error).read_text(errors="replace").strip().splitlines()[-3:]
        checks.append((f"PostgreSQL: 2 processes ≥ {TARGET_PG_RATIO:g}× 1 process cards/s",
                       "relaybot did not run on PostgreSQL: " + " | ".join(tail), False))
    for name, detail, ok in checks:
        print(f"  {verdict(ok)}  {name:<62} {detail}")
    if args.smoke:
        print("\n(smoke run: short windows on a shared machine; the verdicts show the script works, not the product)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
