"""Load test for ``peftkit serve``: N concurrent streaming clients for T seconds, on loopback only.

::

    peftkit serve --experts experts/ &            # note its pid
    python scripts/load_test.py --clients 200 --duration 60 --server-pid $!

Each client is a bounded loop of streaming chat (or ``--endpoint completions``) requests: at most
``--max-requests``, none started after ``--duration`` (the requests under way then finish: ``drain_s``).
Client ``c``'s ``i``-th request goes to expert ``(c + i) mod len(experts)`` (default: every model
``/v1/models`` lists). A 429 is counted apart (it is the server shedding load as intended) and the
client waits ``Retry-After`` before its next request. Every other failure (a status, a broken stream,
a timeout) is an error.

Reports requests, errors by status, p50/p99 latency and time to first token, generated tokens/s
(over the whole run, drain included), and the server's resident memory before and after: ``VmRSS``
(and peak ``VmHWM``) of ``/proc/<--server-pid>/status``, or ``process_resident_memory_bytes`` from
``/metrics``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import re
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx


@dataclass
class Results:
    ok: int = 0
    rejected: int = 0  # 429: intended load shedding
    errors: Counter = field(default_factory=Counter)
    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    per_expert: Counter = field(default_factory=Counter)


def require_loopback(url: str) -> str:
    """The URL's host, if every address it resolves to is a loopback address; else ``SystemExit``."""
    host = urlparse(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise SystemExit(f"--url {url}: cannot resolve {host!r}: {exc}") from None
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"--url {url}: {host} is not a loopback address; this load test runs on loopback only")
    return host


def server_rss(pid: int | None, url: str, headers: dict[str, str]) -> dict[str, float] | None:
    """The server's memory in MiB: ``{rss, peak}`` from ``/proc/<pid>/status``, else ``{rss}`` from /metrics."""
    if pid is not None:
        status = Path(f"/proc/{pid}/status").read_text()
        values = {k: int(v) / 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M)}
        return {"rss": values["VmRSS"], "peak": values["VmHWM"]}
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    found = re.search(r"^process_resident_memory_bytes ([0-9.e+]+)$", text, re.M)
    return {"rss": float(found.group(1)) / 2**20} if found else None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_request(
    client: httpx.AsyncClient, args: argparse.Namespace, expert: str, prompt: str, results: Results
) -> float:
    """Send one streaming request; returns how long to wait before the next (Retry-After on 429)."""
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    body = {"model": expert, "max_tokens": args.max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    body.update({"messages": [{"role": "user", "content": prompt}]} if args.endpoint == "chat" else {"prompt": prompt})
    if args.temperature is not None:
        body["temperature"] = args.temperature
    start = time.perf_counter()
    first, tokens, done = None, 0, False
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code == 429:
                await response.aread()
                results.rejected += 1
                return float(response.headers.get("retry-after", 1))
            if response.status_code != 200:
                await response.aread()
                results.errors[str(response.status_code)] += 1
                return 0.0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    results.errors["stream error"] += 1
                    return 0.0
                if first is None and chunk.get("choices"):
                    choice = chunk["choices"][0]
                    if choice.get("text") or (choice.get("delta") or {}).get("content"):
                        first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        results.errors[type(exc).__name__] += 1
        return 0.0
    if not done:
        results.errors["stream ended without [DONE]"] += 1
        return 0.0
    results.ok += 1
    results.latency.append(time.perf_counter() - start)
    if first is not None:
        results.ttft.append(first)
    results.tokens += tokens
    results.per_expert[expert] += 1
    return 0.0


async def client_loop(
    index: int, client: httpx.AsyncClient, args: argparse.Namespace, experts: list[str], deadline: float, r: Results
) -> None:
    for i in range(args.max_requests):
        if time.perf_counter() >= deadline:
            return
        expert = experts[(index + i) % len(experts)]
        prompt = f"Client {index}, request {i}: write one short sentence about the number {index * 7 + i}."
        wait = await one_request(client, args, expert, prompt, r)
        if wait:
            await asyncio.sleep(min(wait, max(0.0, deadline - time.perf_counter())))


async def run(args: argparse.Namespace, experts: list[str], headers: dict[str, str]) -> tuple[Results, float]:
    results = Results()
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    timeout = httpx.Timeout(args.request_timeout, connect=30)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits, timeout=timeout) as client:
        start = time.perf_counter()
        deadline = start + args.duration
        await asyncio.gather(*(client_loop(c, client, args, experts, deadline, results) for c in range(args.clients)))
        return results, time.perf_counter() - start


def main_report(args: argparse.Namespace, results: Results, elapsed: float, experts: list[str]) -> dict[str, object]:
    return {
        "clients": args.clients,
        "duration_s": args.duration,
        "drain_s": round(max(0.0, elapsed - args.duration), 1),
        "experts": len(experts),
        "max_tokens": args.max_tokens,
        "requests_ok": results.ok,
        "rejected_429": results.rejected,
        "errors": dict(results.errors),
        "latency_p50_s": round(percentile(results.latency, 0.5), 3),
        "latency_p99_s": round(percentile(results.latency, 0.99), 3),
        "ttft_p50_s": round(percentile(results.ttft, 0.5), 3),
        "ttft_p99_s": round(percentile(results.ttft, 0.99), 3),
        "generated_tokens": results.tokens,
        "tokens_per_s": round(results.tokens / elapsed, 1),
        "requests_per_s": round(results.ok / elapsed, 2),
        "requests_per_expert": dict(sorted(results.per_expert.items())),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    parser.add_argument("--clients", type=int, default=200, help="concurrent streaming clients (default 200)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--max-requests", type=int, default=1000, help="requests per client, at most (default 1000)")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens per request (default 16)")
    parser.add_argument("--temperature", type=float, default=None, help="override the experts' temperature")
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    parser.add_argument("--experts", help="comma-separated models to spread requests over (default: all listed)")
    parser.add_argument("--api-key", default=None, help="the server's API key, if it has one")
    parser.add_argument("--server-pid", type=int, default=None, help="read the server's memory from /proc")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default 600)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here as JSON")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.max_requests < 1 or args.max_tokens < 1:
        parser.error("--clients, --duration, --max-requests and --max-tokens must be positive")
    require_loopback(args.url)
    args.url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.experts:
        experts = [e for e in args.experts.split(",") if e]
    else:
        listed = httpx.get(f"{args.url}/v1/models", headers=headers, timeout=30)
        listed.raise_for_status()
        experts = [m["id"] for m in listed.json()["data"]]
    before = server_rss(args.server_pid, args.url, headers)
    results, elapsed = asyncio.run(run(args, experts, headers))
    after = server_rss(args.server_pid, args.url, headers)
    report = {
        **main_report(args, results, elapsed, experts),
        "server_memory_mib_before": before,
        "server_memory_mib_after": after,
    }
    for key, value in report.items():
        print(f"{key:>26}: {value}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
