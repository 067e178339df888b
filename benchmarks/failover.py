"""Gateway failover on kind: how long new flows fail when a meshlink replica goes, two
replicas against one (issue 12).

    python benchmarks/failover.py [--quick] [--json PATH] [--keep] [--faults A,B] [--reps N]

Needs root and what hack/kind.sh needs (it installs Docker if missing). Brings up two kind
clusters with meshlink deployed from manifests/ and linked (tests/kindbed.py, the e2e
tests' harness; prefix mlfail): c1 with two worker nodes, so its two meshlink replicas run
on separate nodes, exports `hweb` (one pod on its control-plane node, out of the faults'
way); a client pod in c2 opens a new connection to hweb's clusterset IP every 50 ms (a GET
with a 1 s deadline) through each fault (tests/kindfaults.py, shared with the e2e tests):
- kill9: kill -9 of a c1 meshlink container (from its node; the container restarts);
- pod_delete: delete of c1's leader pod (preStop, SIGTERM, a new pod);
- node_cut: the node of c1's leader off the Docker network for 10 s;
- sigstop_leader: SIGSTOP of c1's leader for 10 s, then SIGCONT;
- rollout_c1, rollout_c2: `kubectl rollout restart` of meshlink in c1 (exporter), c2
  (importer).
Per fault: the longest gap with no successful new connection (from the fault, or the last
success before a failure, to the next success; p50 and max over the repetitions: 5, 2 with
--quick) and the share of connections that failed (all repetitions pooled; the window runs
from the fault until connections have succeeded for a second, at least 15 s, or the rollout
plus 3 s). Then both Deployments are scaled to one replica and the same faults measured
again (the baseline). The table puts them side by side with their ratio; --json writes
{"replicas": 2, "faults": {NAME: {"gap_p50_s", "gap_max_s", "failed_pct"}},
 "baseline": {"replicas": 1, "faults": {...}}} with the raw gaps beside.
--keep leaves the clusters up (and reuses them next time).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import _common as C  # noqa: E402

from tests.kindbed import KindTestbed, wait_pod_ready, wait_rollout  # noqa: E402
from tests.kindfaults import (  # noqa: E402
    CLIENT,
    FAULTS,
    MESHLINK_NS,
    NS,
    SERVICE,
    Bed,
    Fault,
    Outcome,
    client_pod,
    objects,
    through,
)
from tests.kube import wait_until  # noqa: E402

PREFIX = "mlfail"


def setup(bed: KindTestbed) -> Bed:
    c1, c2 = bed.clusters
    for c in (c1, c2):
        c.kubectl("create", "namespace", NS, check=False)
    c1.apply(objects("c1", bed.tools_image))
    if not c2.exists("pod", CLIENT, "-n", NS):
        client_pod(c2, bed.tools_image)
    wait_rollout(c1, NS, f"deploy/{SERVICE}")
    wait_pod_ready(c2, NS, CLIENT)

    def ip() -> str | None:
        si = c2.find("serviceimport", SERVICE, "-n", NS)
        ips = si.get("spec", {}).get("ips") if si is not None else None
        return str(ips[0]) if ips else None

    return Bed(c1, c2, wait_until(ip, 120, f"{SERVICE} imported in c2", interval=0.5))


def scale(bed: Bed, replicas: int) -> None:
    for c in (bed.c1, bed.c2):
        c.kubectl("-n", MESHLINK_NS, "scale", "deploy/meshlink", f"--replicas={replicas}")
    bed.replicas = replicas
    bed.settle()


def measure(bed: Bed, faults: list[Fault], reps: int) -> dict[str, list[Outcome]]:
    out: dict[str, list[Outcome]] = {}
    for fault in faults:
        for r in range(reps):
            o = through(bed, fault)
            out.setdefault(fault.name, []).append(o)
            print(
                f"replicas {bed.replicas}, {fault.name} #{r + 1}: "
                f"{o.gap.line(o.fault.what)} ({C.load_line()})",
                file=sys.stderr,
            )
            bed.settle()
    return out


def summary(runs: dict[str, list[Outcome]]) -> dict[str, dict[str, Any]]:
    res: dict[str, dict[str, Any]] = {}
    for name, outs in runs.items():
        gaps = [o.gap.gap_s for o in outs]
        failed = sum(o.gap.failed for o in outs)
        attempts = sum(o.gap.attempts for o in outs)
        res[name] = {
            "gap_p50_s": round(C.median(gaps), 3),
            "gap_max_s": round(max(gaps), 3),
            "failed_pct": round(100.0 * failed / attempts, 3) if attempts else None,
            "gaps_s": gaps,
            "failed": failed,
            "attempts": attempts,
            "recovered": all(o.gap.recovered for o in outs),
        }
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 repetitions per fault, not 5")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--keep", action="store_true", help="leave the clusters up (and reuse them)")
    ap.add_argument("--faults", help=f"a comma list of {','.join(f.name for f in FAULTS)}")
    ap.add_argument("--reps", type=int, help="repetitions per fault (overrides --quick)")
    args = ap.parse_args()
    wanted = set(args.faults.split(",")) if args.faults else {f.name for f in FAULTS}
    unknown = wanted - {f.name for f in FAULTS}
    if unknown:
        ap.error(f"unknown faults: {', '.join(sorted(unknown))}")
    faults = [f for f in FAULTS if f.name in wanted]
    reps = args.reps or (2 if args.quick else 5)
    state = KindTestbed.kept_state(PREFIX)
    t0 = time.monotonic()
    try:
        kind = KindTestbed.up(2, state, prefix=PREFIX, workers="2,0")
    except BaseException:
        if not args.keep:
            KindTestbed.teardown(state, PREFIX)
        raise
    try:
        bed = setup(kind)
        scale(bed, 2)
        ha = summary(measure(bed, faults, reps))
        scale(bed, 1)
        one = summary(measure(bed, faults, reps))
        scale(bed, 2)
    finally:
        if not args.keep:
            KindTestbed.teardown(state, PREFIX)
    rows = []
    for f in faults:
        a, b = ha[f.name], one[f.name]
        rows.append(
            (
                f.name,
                a["gap_p50_s"],
                a["gap_max_s"],
                a["failed_pct"],
                b["gap_p50_s"],
                b["gap_max_s"],
                b["failed_pct"],
                C.ratio(b["gap_max_s"], a["gap_max_s"]),
            )
        )
    print(C.load_line())
    print(f"new flows through each fault, {reps} repetitions; gaps in s, failed in %")
    C.print_table(
        (
            "fault",
            "gap p50 (2)",
            "gap max (2)",
            "failed % (2)",
            "gap p50 (1)",
            "gap max (1)",
            "failed % (1)",
            "max gap 1 vs 2",
        ),
        rows,
    )
    missed = [f.name for f in faults if ha[f.name]["gap_max_s"] >= 2.0]
    print(
        "2 s target for new flows with two replicas: "
        + (f"missed by {', '.join(missed)}" if missed else "met by every fault")
    )
    C.write_json(
        args.json,
        {
            "replicas": 2,
            "faults": ha,
            "baseline": {"replicas": 1, "faults": one},
            "repetitions": reps,
            "quick": args.quick,
            "bringup_s": round(kind.up_seconds, 1),
            "load": C.load_line(),
            "total_s": round(time.monotonic() - t0, 1),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
