"""A bounded load test of `ddil serve`: N concurrent clients send a fixed number of requests to the real KServe
ModelServer on 127.0.0.1; latency percentiles (p50/p95/p99), images/s and failed requests, for the server's request
batching at batch sizes 1, 4 and 8 (`--max-batch-size`), through KServe v1 (`POST /v1/models/NAME:predict`) and
the OpenAI images API (`POST /openai/v1/images/generations`) side by side.

One server per batch size runs for the whole benchmark (started together, each waited for until ready) and answers
both protocols; the rounds visit the cases (batch size, protocol) in rotated order so that load from other
processes hits every case alike. In a round each case gets `--requests` requests of `--images-per-request` images
from `--clients` client threads, each with its own keep-alive connection (httpx for both protocols, so the client
side costs the same), as fast as the answers come: v1 requests carry distinct prompts and seeds, OpenAI requests
one prompt with `n` images (seeds seed, seed + 1, ...). The mean batch the server actually formed is read from its
/metrics (ddil_serve_images_total / ddil_serve_batches_total). Warm-up requests before the first round are left
out. Local only: nothing leaves 127.0.0.1.

The student is a folder (`--model`), or by default a tiny LCM student (tiny://sd15 teacher, 2 steps) distilled
here in a few seconds: with a 16x16 image the model is small and HTTP, JSON and PNG encoding weigh as much as the
UNet, so the numbers show the server's overheads and its batching, not a GPU's throughput.

    python benchmarks/serve_load.py                      # about 2 minutes on 2 cores
    python benchmarks/serve_load.py --quick
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NAME = "student"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_student(root: Path, data: Path) -> Path:
    """A 2-step LCM student of tiny://sd15 (LCMScheduler with its own timesteps), as tests/serving/test_serve.py
    uses."""
    from ddil_core.stages.distill import distill

    latents, rollouts = common.build_data(data, limit=32, rollouts=8)
    config = common.tiny_config(*common.data_overrides(limit=32, rollouts=8), "objective.name=lcm")
    return distill(config, latents, [rollouts], root / "lcm")


class Server:
    def __init__(self, model: str, max_batch_size: int, threads: int, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.max_batch_size = max_batch_size
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(common.ROOT))
        self.command = [sys.executable, "-m", "ddil_core.cli", "serve", "--model", model, "--name", NAME,
                        "--host", "127.0.0.1", "--http-port", str(self.port), "--max-batch-size", str(max_batch_size)]
        self.log = log
        self.process = subprocess.Popen(self.command, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ddil serve exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/v2/models/{NAME}/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"ddil serve on {self.url} not ready in {timeout} s")

    def counters(self) -> tuple[float, float]:
        """(images, batches) generated so far, from the server's /metrics."""
        import httpx

        images = batches = 0.0
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            match = re.match(r'ddil_serve_(images|batches)_total\{[^}]*model="' + NAME + r'"[^}]*\} (\S+)', line)
            if match:
                if match.group(1) == "images":
                    images += float(match.group(2))
                else:
                    batches += float(match.group(2))
        return images, batches

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(60)


def request(protocol: str, n: int, images: int) -> tuple[str, dict, str]:
    """(path, body, the response's list of images) of one request of `images` images starting at index `n`."""
    if protocol == "openai":
        return ("/openai/v1/images/generations",
                {"prompt": f"a handwritten digit {DIGITS[n % 10]}", "n": images, "seed": n}, "data")
    return (f"/v1/models/{NAME}:predict",
            {"instances": [{"prompt": f"a handwritten digit {DIGITS[(n + k) % 10]}", "seed": n + k}
                           for k in range(images)]}, "predictions")


def load(url: str, requests: int, clients: int, images_per_request: int, offset: int, protocol: str = "v1") -> dict:
    """`requests` requests from `clients` threads; latencies of the successful ones, failures, wall seconds."""
    import httpx

    latencies, failures, lock = [], [], threading.Lock()
    next_index = iter(range(requests))

    def client():
        with httpx.Client(timeout=300) as http:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                path, body, images = request(protocol, offset + i * images_per_request, images_per_request)
                t0 = time.perf_counter()
                try:
                    response = http.post(f"{url}{path}", json=body)
                    ok = response.status_code == 200 and len(response.json()[images]) == images_per_request
                    detail = None if ok else f"{response.status_code}: {response.text[:200]}"
                except Exception as exc:  # noqa: BLE001 - a failed request is counted, not fatal
                    ok, detail = False, f"{type(exc).__name__}: {exc}"
                elapsed = time.perf_counter() - t0
                with lock:
                    (latencies.append(elapsed) if ok else failures.append(detail))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "failures": failures, "seconds": time.perf_counter() - start}


def percentile(values, q):
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--model", help="student folder to serve (default: a tiny LCM student made here)")
    parser.add_argument("--data", help="latent cache + rollouts folder for that student (made when missing)")
    parser.add_argument("--batch-sizes", default="1,4,8", help="server --max-batch-size values, one server each")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--requests", type=int, default=96, help="requests per case per round")
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=8, help="untimed requests per server before the first round")
    parser.add_argument("--protocols", default="v1,openai", help="v1 and/or openai, each a case per batch size")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.requests, args.warmup, args.clients = 1, 4, 1, 2
    threads = common.setup(args.threads)
    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    protocols = [p for p in args.protocols.split(",") if p]
    if set(protocols) - {"v1", "openai"}:
        parser.error(f"--protocols: {args.protocols!r}, expected v1 and/or openai")
    keys = [(b, p) for b in sizes for p in protocols]
    work = Path(tempfile.mkdtemp(prefix="ddil-serve-load-"))
    model = args.model or str(tiny_student(work, Path(args.data) if args.data else work / "data"))
    servers = {b: Server(model, b, threads, work / f"serve-{b}.log") for b in sizes}
    try:
        for server in servers.values():
            server.wait_ready()
        for (b, protocol) in keys:
            warm = load(servers[b].url, args.warmup, min(args.clients, args.warmup), args.images_per_request, 10**6,
                        protocol)
            if warm["failures"]:
                raise RuntimeError(f"warm-up failed on batch size {b}, {protocol}: {warm['failures'][:3]}")
        rounds = {k: [] for k in keys}
        counted = {k: [0.0, 0.0] for k in keys}
        for r in range(args.rounds):
            for (b, protocol) in common.rotated(keys, r):
                before = servers[b].counters()
                result = load(servers[b].url, args.requests, args.clients, args.images_per_request,
                              r * args.requests * args.images_per_request, protocol)
                after = servers[b].counters()
                counted[(b, protocol)][0] += after[0] - before[0]
                counted[(b, protocol)][1] += after[1] - before[1]
                rounds[(b, protocol)].append(result)
    finally:
        codes = {b: s.stop() for b, s in servers.items()}

    cases, rows = {}, []
    for (b, protocol) in keys:
        results = rounds[(b, protocol)]
        latencies = [x for res in results for x in res["latencies"]]
        failures = [f for res in results for f in res["failures"]]
        per_round = [(len(res["latencies"]) * args.images_per_request) / res["seconds"] for res in results]
        images, batches = counted[(b, protocol)]
        case = cases[f"batch_{b}_{protocol}"] = {
            "max_batch_size": b, "protocol": protocol, "requests": len(latencies) + len(failures),
            "failed_requests": len(failures), "failures_sample": failures[:5],
            "latency_seconds": {q: percentile(latencies, int(q[1:])) for q in ("p50", "p95", "p99")},
            "images_per_second": common.spread(per_round), "images_per_second_per_round": per_round,
            "mean_batch_formed": images / batches if batches else None, "server_exit_code": codes[b]}
        lat = case["latency_seconds"]
        rows.append([b, protocol, len(latencies) + len(failures), len(failures),
                     lat["p50"] * 1e3 if lat["p50"] else None, lat["p95"] * 1e3 if lat["p95"] else None,
                     lat["p99"] * 1e3 if lat["p99"] else None, common.median(per_round), case["mean_batch_formed"]])
    headers = ["max batch size", "protocol", "requests", "failed", "p50 ms", "p95 ms", "p99 ms", "images/s (median of rounds)",
               "mean batch formed"]
    print(common.table(headers, rows))
    result = {
        "settings": {"model": args.model or "tiny LCM student (tiny://sd15, 2 steps, 16x16)", "batch_sizes": sizes,
                     "clients": args.clients, "requests_per_round": args.requests, "rounds": args.rounds,
                     "images_per_request": args.images_per_request, "warmup": args.warmup, "threads": threads,
                     "quick": args.quick, "protocols": protocols,
                     "server_command": f"ddil serve --model MODEL --name {NAME} --host 127.0.0.1 --max-batch-size B"},
        "cases": cases,
        "table_markdown": common.table(headers, rows),
    }
    common.write_results("serve_load", result, args.out, args.update_docs)
    return result


if __name__ == "__main__":
    main()
