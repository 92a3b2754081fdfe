"""What the proxy's signature check (server/keycheck.py) costs: its CPU per request, and the latency it adds to a
signed Fleet request through nginx, on loopback.

1. The check alone, started as fedpetah-server starts it, asked over one keep-alive connection (as nginx's upstream
   pool does) with headers signed by Flower's own ``sign_message``: valid ones (a fresh timestamp each), forged ones
   (signed by another key) and ones naming an unregistered key. Its CPU time (user + system, from /proc) per request,
   and the round trip's median and 99th percentile.
2. Through nginx: the same signed ``get-run`` (Flower answers each: the node id is not the key's) on a keep-alive
   TLS connection, behind the proxy of commit ``--before`` (the key was only named in a ``map``) and behind
   server/proxy.py (auth_request to the check); a fresh SuperLink + proxy for each.

    python benchmarks/signature_check.py --before 75f9d08

Writes benchmarks/results/signature_check.json and .md.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from flood import head_commit, load_proxy, stack  # noqa: E402
from flwr.supercore.date import now  # noqa: E402
from flwr.supercore.primitives.asymmetric import sign_message  # noqa: E402

from flower_glue.launch import free_port, stop_tree  # noqa: E402
from server import proxy as current_proxy  # noqa: E402
from server.certificates import TlsFiles, make_node_key  # noqa: E402


def signed(private: ec.EllipticCurvePrivateKey, public_pem: bytes) -> dict[str, str]:
    """The headers a SuperNode sends (flwr/supernode/node_auth_http_interceptor.py), signed now by ``private``."""
    timestamp = now().isoformat()
    return {"flwr-public-key": base64.b64encode(public_pem).decode(), "flwr-timestamp": timestamp,
            "flwr-signature": base64.b64encode(sign_message(private, timestamp.encode("ascii"))).decode()}


def percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {"p50_ms": round(statistics.median(ordered) * 1e3, 3),
            "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1e3, 3)}


def check_alone(root: Path, count: int) -> list[dict[str, Any]]:
    """The check's CPU and round trip per request, for valid, forged and unregistered headers."""
    private_path, public_path = make_node_key(root / "nodes" / "node")
    device = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
    pem = current_proxy.keycheck.flower_public_key(public_path)[0]
    stranger = ec.generate_private_key(ec.SECP384R1())
    unregistered_pem = stranger.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    port = free_port()
    proxy = current_proxy.FleetProxy("nginx", ("127.0.0.2", 0), 0, TlsFiles(root, root, root), root,
                                     root / "logs" / "proxy.log", port, root / "nodes")
    process = proxy.start_keycheck(timeout=30.0)
    rows = []
    try:
        check = psutil.Process(process.pid)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        signers = {"valid signature": (device, pem, 204), "forged signature": (stranger, pem, 401),
                   "unregistered key": (stranger, unregistered_pem, 401)}
        for kind, (private, public, expected) in signers.items():
            headers = [signed(private, public) for _ in range(count)]  # type: ignore[arg-type]
            before = check.cpu_times()
            times = []
            for sent in headers:
                started = time.perf_counter()
                connection.request("GET", "/_fedpetah_keycheck", headers=sent)
                response = connection.getresponse()
                response.read()
                times.append(time.perf_counter() - started)
                assert response.status == expected, (kind, response.status, response.getheader("X-Fedpetah-Refusal"))
            after = check.cpu_times()
            cpu = (after.user - before.user) + (after.system - before.system)
            rows.append({"what": f"check alone, {kind}", "requests": count,
                         "cpu_ms_per_request": round(cpu / count * 1e3, 3), **percentiles(times),
                         "loadavg": [round(x, 2) for x in os.getloadavg()]})
            print(json.dumps(rows[-1]), flush=True)
        connection.close()
        rows.append({"what": "check's resident memory", "rss_mb": round(check.memory_info().rss / 2**20, 1)})
    finally:
        stop_tree(process)
    return rows


def through_nginx(label: str, module: ModuleType, count: int, source: str) -> dict[str, Any]:
    """Round trips of signed get-run requests through the proxy of ``module`` to Flower."""
    with tempfile.TemporaryDirectory(prefix="signature-") as tmp, stack(Path(tmp), module) as (link, port, ca, key):
        device = serialization.load_ssh_private_key(key.with_suffix("").read_bytes(), password=None)
        pem = current_proxy.keycheck.flower_public_key(key)[0]
        headers = [{"Content-Type": "application/protobuf", **signed(device, pem)}  # type: ignore[arg-type]
                   for _ in range(count)]
        connection = http.client.HTTPSConnection("127.0.0.2", port, timeout=10, source_address=(source, 0),
                                                 context=ssl.create_default_context(cafile=str(ca)))
        times, statuses = [], set()
        for sent in headers:
            started = time.perf_counter()
            connection.request("POST", "/v1/fleet/get-run", body=b"", headers=sent)
            response = connection.getresponse()
            body = response.read()
            times.append(time.perf_counter() - started)
            statuses.add((response.status, body[:60]))
        connection.close()
    row = {"what": f"signed get-run through nginx, {label}", "requests": count, **percentiles(times),
           "answers": sorted(f"{status} {body.decode(errors='replace')}" for status, body in statuses),
           "loadavg": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(row), flush=True)
    return row


def markdown(report: dict[str, Any]) -> str:
    lines = ["# The proxy's signature check: CPU and added latency (benchmarks/signature_check.py)", "",
             f"`{report['command']}` at commit {report['commit']} on {report['machine']}, loopback.", "",
             "| what | requests | CPU ms / request | p50 ms | p99 ms | load (1, 5, 15 min) |",
             "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        if "rss_mb" in row:
            continue
        lines.append(f"| {row['what']} | {row['requests']} | {row.get('cpu_ms_per_request', '')} | {row['p50_ms']} | "
                     f"{row['p99_ms']} | {' '.join(map(str, row['loadavg']))} |")
    rss = [row["rss_mb"] for row in report["rows"] if "rss_mb" in row]
    lines += ["", f"The check's resident memory: {rss[0] if rss else '?'} MB (Flower's modules imported)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", metavar="REV", help="also measure the proxy of this commit through nginx")
    parser.add_argument("--requests", type=int, default=300, help="per row (nginx bursts 400 per address)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "signature_check")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="keycheck-") as tmp:
        rows = check_alone(Path(tmp), args.requests * 4)
    if args.before:
        rows.append(through_nginx(f"before ({args.before}, key named in a map)", load_proxy(args.before),
                                  args.requests, "127.0.0.6"))
    rows.append(through_nginx("after (auth_request to the check)", current_proxy, args.requests, "127.0.0.7"))
    report = {"command": "python benchmarks/signature_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "commit": head_commit(), "machine": f"{platform.machine()}, {psutil.cpu_count()} cores", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
