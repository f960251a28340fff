"""The fleet under outages: three sites (a real ``asd-monitor run`` and a mosquitto each, bridged
to a central mosquitto with the shipped config/fleet/ files), alerts raised continuously from the
bundled fan recordings replayed at 10x, and central consumers (tests/fleet/). Each scenario cuts
something for ``--cut`` seconds (60 by default) while alerts are being raised, restores it, and
compares what the consumers received with the daemons' own event logs (the ground truth).

Scenarios:
  wan-reset       every site's WAN link cut with resets (the bridges see it drop), central up
  wan-blackhole   every site's WAN link silently dead (the bridges notice by keepalive only)
  wan-acks-lost   every site's link loses what comes back from the centre (PUBACKs): duplicates
  central-shared  the central broker stopped; consumers in an MQTT v5 shared subscription
  central-durable the central broker stopped; one consumer with a plain durable subscription
  site-broker     site 1's broker stopped (its daemon's outbox holds the alerts)
  daemon-kill     site 1's daemon killed with SIGKILL, restarted after the cut

Per scenario: alerts raised (during the cut, by the sites it affected), held back (logged by an
affected site before the restore and not received by then), received, duplicate arrivals before
and after de-duplication by (site, event_id, type), lost, the delay from the restore to the first
arrival of each alert held back, and how long the bridges took to reconnect.

    .venv/bin/python benchmarks/fleet.py            # all scenarios, ~12 minutes
    .venv/bin/python benchmarks/fleet.py --merge --cut 5 --scenarios central-shared central-durable
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from common import RESULTS, LoadMonitor, environment, table

from tests.fleet.consumer import AlertKey, first_arrivals
from tests.fleet.fleet import Fleet
from tests.fleet.wan import CutKind

SCENARIOS = ("wan-reset", "wan-blackhole", "wan-acks-lost", "central-shared", "central-durable", "site-broker", "daemon-kill")
WAN_CUTS: dict[str, CutKind] = {"wan-reset": "reset", "wan-blackhole": "blackhole", "wan-acks-lost": "acks-lost"}
WARM_SECONDS = 10.0  # alerts flowing normally before the cut
AFTER_SECONDS = 15.0  # alerts flowing normally after the restore, before the daemons stop
DELIVERY_TIMEOUT = 90.0  # the daemon's reconnect backoff reaches 60 s in a long outage


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@dataclass
class Outage:
    """What one scenario broke and when (epoch seconds); ``received`` is what the consumers held
    at the restore, ``bridges_back`` how long the bridges then took to reconnect (None where no
    bridge went down)."""

    sites: list[str]
    began: float
    restored: float
    received: set[AlertKey]
    bridges_back: float | None = None


def _break(fleet: Fleet, scenario: str, cut: float) -> Outage:
    """Break, wait ``cut`` seconds, restore."""
    site = fleet.sites[0]
    before = fleet.bridges_connected()
    began = time.time()
    if scenario in ("site-broker", "daemon-kill"):
        if scenario == "site-broker":
            site.broker.stop()
            time.sleep(cut)
            site.broker.start()
        else:
            site.kill_daemon()
            time.sleep(cut)
            site.start_daemon()
        return Outage([site.name], began, time.time(), fleet.received())
    if scenario in WAN_CUTS:
        fleet.cut_wan(WAN_CUTS[scenario])
        time.sleep(cut)
        restored = fleet.restore_wan()
    else:
        restored = fleet.restart_central(cut)
    outage = Outage([s.name for s in fleet.sites], began, restored, fleet.received())
    outage.bridges_back = fleet.wait_bridges(before, timeout=60)
    return outage


def _figures(values: list[float], digits: int = 2) -> dict[str, float] | None:
    return {"median": round(statistics.median(values), digits), "max": round(max(values), digits)} if values else None


def run(scenario: str, cut: float, speed: float, directory: Path) -> dict[str, Any]:
    durable = scenario == "central-durable"
    with closing(Fleet(directory, speed=speed, shared=not durable, consumers_count=1 if durable else 2)) as fleet:
        fleet.start()
        fleet.start_daemons()
        fleet.wait_alerts(1)
        time.sleep(WARM_SECONDS)
        outage = _break(fleet, scenario, cut)
        time.sleep(AFTER_SECONDS)
        try:
            fleet.wait_delivered(fleet.truth(), timeout=DELIVERY_TIMEOUT)
        except AssertionError:
            pass  # counted as lost below
        for site in fleet.sites:
            site.stop_daemon()
        truth = fleet.truth()
        try:
            fleet.wait_delivered(truth, timeout=30)
        except AssertionError:
            pass
        raised = [a for site in fleet.sites for a in site.raised()]
        arrivals = fleet.arrivals()
        first = first_arrivals(arrivals)

    def key(alert: dict) -> tuple[str, str, str]:
        return alert["site"], alert["event_id"], alert["type"]

    hit = [a for a in raised if a["site"] in outage.sites]
    during = [a for a in hit if outage.began <= _epoch(a["logged"]) <= outage.restored]
    # Held back by the outage: logged by an affected site before the restore, not received then.
    held = [a for a in hit if _epoch(a["logged"]) <= outage.restored and key(a) not in outage.received]
    # Undisturbed: logged well away from the outage (or at a site it did not touch).
    settled = outage.restored + (outage.bridges_back or 0.0) + 5.0
    calm = [a for a in raised if a["site"] not in outage.sites or not outage.began - 5.0 <= _epoch(a["logged"]) <= settled]
    lost = truth - set(first)
    return {
        "scenario": scenario,
        "cut_seconds": cut,
        "sites_affected": outage.sites,
        "alerts_raised": len(truth),
        "raised_during_cut": len(during),
        "held_back_at_restore": len(held),
        "received_unique": len(set(first) & truth),
        "arrivals": len(arrivals),
        "duplicates_before_dedupe": len(arrivals) - len(first),
        "duplicates_after_dedupe": 0,  # first_arrivals keeps one arrival per key by construction
        "redelivered_flag": sum(a.redelivered for a in arrivals),
        "phantoms": len(set(first) - truth),
        "lost": len(lost),
        "lost_alerts": sorted(map(list, lost))[:20],
        "bridges_reconnected_s": None if outage.bridges_back is None else round(outage.bridges_back, 2),
        "delay_after_restore_s": _figures([first[key(a)].at - outage.restored for a in held if key(a) in first]),
        "latency_undisturbed_s": _figures([first[key(a)].at - _epoch(a["logged"]) for a in calm if key(a) in first], 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cut", type=float, default=60.0, help="seconds each outage lasts (default 60)")
    parser.add_argument("--speed", type=float, default=10.0, help="replay speed, x real time (default 10: an alert every 2 s per site)")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--out", type=Path, default=RESULTS / "fleet.json")
    parser.add_argument("--merge", action="store_true",
                        help="keep the results already in --out, replacing those of the same scenario and cut")
    args = parser.parse_args()
    # SIGTERM ends the run through the with-blocks, so no daemon or broker outlives it.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    results = []
    with LoadMonitor() as load:
        for scenario in args.scenarios:
            with tempfile.TemporaryDirectory(prefix=f"fleet-{scenario}-") as tmp:
                results.append(run(scenario, args.cut, args.speed, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    this_run = {"environment": environment(), "load": load.summary(), "cut_seconds": args.cut, "speed": args.speed,
                "scenarios": args.scenarios}
    runs = []
    if args.merge and args.out.exists():
        previous = json.loads(args.out.read_text())
        done = {(r["scenario"], r["cut_seconds"]) for r in results}
        results = [r for r in previous["results"] if (r["scenario"], r["cut_seconds"]) not in done] + results
        runs = previous["runs"]
    rows = [[r["scenario"], r["cut_seconds"], r["alerts_raised"], r["raised_during_cut"], r["held_back_at_restore"],
             r["received_unique"], r["duplicates_before_dedupe"], r["duplicates_after_dedupe"], r["lost"],
             r["bridges_reconnected_s"], r["delay_after_restore_s"] and r["delay_after_restore_s"]["median"],
             r["delay_after_restore_s"] and r["delay_after_restore_s"]["max"]] for r in results]
    table(["scenario", "cut s", "raised", "in cut", "held back", "received", "dups before", "dups after", "lost",
           "bridges back s", "delay med s", "delay max s"], rows, title=f"3 sites, replay at {args.speed:g}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": [*runs, this_run], "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
