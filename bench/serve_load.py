"""A bounded load test of `loraens serve`: N requests at concurrency K against a server on this machine.

    loraens serve runs/demo --port 8765 &
    python bench/serve_load.py --url http://127.0.0.1:8765 --requests 500 --concurrency 16 --questions q.jsonl

Each request is one question, cycling over the questions of a file (JSONL rows with "question"
and "choices"; default: a few built-in ones). Prints requests/s, p50/p95/max latency, the status
codes, and the server's forward count from /health before and after (batching shows as fewer
forwards than requests). Only loopback addresses are accepted: the test never leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

QUESTIONS = [
    {"question": "Which gas do plants take in from the air to make food?",
     "choices": ["oxygen", "carbon dioxide", "nitrogen", "helium"]},
    {"question": "What is the boiling point of water at sea level?", "choices": ["50 C", "100 C", "150 C", "0 C"]},
    {"question": "Which planet is closest to the Sun?", "choices": ["Venus", "Earth", "Mercury", "Mars"]},
    {"question": "What do bees make?", "choices": ["milk", "honey", "silk"]},
]


@dataclass
class LoadResult:
    requests: int
    concurrency: int
    seconds: float
    latencies: list[float]  # seconds, of the successful requests
    statuses: dict[int, int]
    responses: list[Any]  # JSON bodies in request order (None where the request failed)
    errors: list[str] = field(default_factory=list)
    forwards: int | None = None  # forwards the server ran during the test (from /health)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))] if xs else float("nan")

    def summary(self) -> str:
        lat = self.latencies
        return (f"{self.requests} requests at concurrency {self.concurrency} in {self.seconds:.2f} s: "
                f"{self.rps:.1f} requests/s; latency p50 {1000 * self.percentile(0.5):.0f} ms, p95 "
                f"{1000 * self.percentile(0.95):.0f} ms, max {1000 * max(lat, default=float('nan')):.0f} ms, "
                f"mean {1000 * statistics.fmean(lat) if lat else float('nan'):.0f} ms; statuses "
                f"{dict(sorted(self.statuses.items()))}; server forwards {self.forwards}")


def _check_local(url: str) -> None:
    host = urlparse(url).hostname or ""
    if not (host == "localhost" or host.startswith("127.") or host == "::1"):
        raise SystemExit(f"refusing {url}: the load test only targets this machine (127.0.0.0/8, ::1, localhost)")


async def run_load(url: str, bodies: list[dict], concurrency: int, timeout: float = 120.0) -> LoadResult:
    """POST every body to `url`/predict with at most `concurrency` requests in flight."""
    _check_local(url)
    results: list[Any] = [None] * len(bodies)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(bodies)):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        before = (await client.get("/health")).json()["counters"]["forwards"]

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t0 = time.perf_counter()
                try:
                    r = await client.post("/predict", json=bodies[i])
                except httpx.HTTPError as err:
                    errors.append(f"request {i}: {type(err).__name__}: {err}")
                    continue
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                    results[i] = r.json()
                else:
                    errors.append(f"request {i}: HTTP {r.status_code}: {r.text[:200]}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
        after = (await client.get("/health")).json()["counters"]["forwards"]
    return LoadResult(len(bodies), concurrency, seconds, latencies, statuses, results, errors, after - before)


def bodies_from(questions: list[dict], n: int) -> list[dict]:
    """n one-question requests cycling over `questions`, each with its own id."""
    return [{"id": f"r{i}", "question": questions[i % len(questions)]["question"],
             "choices": list(questions[i % len(questions)]["choices"])} for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--questions", type=Path, help="JSONL file of questions (default: a few built-in ones)")
    p.add_argument("--limit", type=int, default=50, help="questions taken from --questions (default: 50)")
    args = p.parse_args()
    questions = QUESTIONS
    if args.questions:
        questions = [json.loads(line) for line in args.questions.read_text().splitlines() if line.strip()][: args.limit]
        questions = [{"question": q.get("question") or q.get("question_stem"),
                      "choices": q["choices"]["text"] if isinstance(q["choices"], dict) else q["choices"]}
                     for q in questions]
    result = asyncio.run(run_load(args.url, bodies_from(questions, args.requests), args.concurrency))
    print(result.summary())
    for e in result.errors[:5]:
        print("  " + e)


if __name__ == "__main__":
    main()
