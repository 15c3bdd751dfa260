"""`lmfleet recsys serve` under load: latency at a fixed request rate and saturation throughput,
dynamic micro-batching against batch size 1.

The server runs as its own process (`--threads 1`), the load generator as another (a small
asyncio HTTP/1.1 client over keep-alive connections), so on a 2-core machine each has a core.

- **Fixed rate** (open loop): requests are due at a steady --rate for --seconds; a request's
  latency counts from when it was due (a late send is the server's delay too, no coordinated
  omission). p50/p99/max and errors.
- **Saturation** (closed loop): --concurrency connections send back to back; requests/s.

Each request is `{"user_id": U, "k": 10}` for a random user of the dataset (histories read from
the dataset). The batched server (--max-batch, --max-wait-ms) and the batch-1 server
(--max-batch 1) take turns --rounds times; each keeps its best.

    python benchmarks/recsys_serving.py --model runs/ml100k/final --data runs/ml100k/data
    python benchmarks/recsys_serving.py --synthetic 60000,100000     # a random-init ~100k-item model

prints one JSON line per measurement and a summary table (ratios against batch 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LMFLEET = str(Path(sys.executable).with_name("lmfleet"))


# ---- load generator (its own process) --------------------------------------------------------------
class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def post(self, path: str, body: bytes, key: str | None) -> int:
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{auth}"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status_line = await self.reader.readline()
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await self.reader.readexactly(length)
        return int(status_line.split()[1])


async def _fixed_rate(port: int, bodies: list[bytes], rate: float, seconds: float, key: str | None,
                      connections: int) -> dict:
    due = asyncio.Queue()
    latencies, errors = [], 0
    conns = [await Connection.open(port) for _ in range(connections)]

    async def worker(conn: Connection) -> None:
        nonlocal errors
        while True:
            item = await due.get()
            if item is None:
                return
            when, body = item
            status = await conn.post("/v1/recommendations", body, key)
            latencies.append(time.perf_counter() - when)
            errors += status != 200

    workers = [asyncio.create_task(worker(c)) for c in conns]
    start = time.perf_counter()
    n = int(rate * seconds)
    for i in range(n):
        when = start + i / rate
        delay = when - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        due.put_nowait((when, bodies[i % len(bodies)]))
    for _ in workers:
        due.put_nowait(None)
    await asyncio.gather(*workers)
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"requests": n, "errors": errors, "achieved_rps": n / elapsed,
            "p50_ms": 1000 * latencies[len(latencies) // 2], "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
            "max_ms": 1000 * latencies[-1], "mean_ms": 1000 * statistics.fmean(latencies)}


async def _saturate(port: int, bodies: list[bytes], concurrency: int, seconds: float, key: str | None) -> dict:
    conns = [await Connection.open(port) for _ in range(concurrency)]
    done, errors = 0, 0
    stop_at = time.perf_counter() + seconds

    async def loop(conn: Connection, offset: int) -> None:
        nonlocal done, errors
        i = offset
        while time.perf_counter() < stop_at:
            status = await conn.post("/v1/recommendations", bodies[i % len(bodies)], key)
            done += 1
            errors += status != 200
            i += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(loop(c, i) for i, c in enumerate(conns)))
    return {"requests": done, "errors": errors, "rps": done / (time.perf_counter() - start)}


def loadgen(args: argparse.Namespace) -> None:
    users = json.loads(Path(args.users_file).read_text())
    rng = random.Random(0)
    bodies = [json.dumps({"user_id": rng.choice(users), "k": 10}).encode() for _ in range(5000)]
    if args.mode == "rate":
        result = asyncio.run(_fixed_rate(args.port, bodies, args.rate, args.seconds, args.key, args.connections))
    else:
        result = asyncio.run(_saturate(args.port, bodies, args.concurrency, args.seconds, args.key))
    print(json.dumps(result))


# ---- the server and the runs ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, data: Path, max_batch: int, max_wait_ms: float) -> tuple[subprocess.Popen, int]:
    import httpx

    port = free_port()
    proc = subprocess.Popen([LMFLEET, "recsys", "serve", str(model), "--data", str(data), "--port", str(port),
                             "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--threads", "1",
                             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start: {proc.stderr.read()}")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_loadgen(port: int, users_file: Path, *extra: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--loadgen", "--port", str(port), "--users-file", str(users_file),
                          *extra], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def synthetic_model(spec: str, root: Path) -> tuple[Path, Path]:
    """A dataset of USERS users over ITEMS items and a random-init SASRec on it (speed only)."""
    import torch

    from lmfleet.recsys.data import RecData, prepare_interactions
    from lmfleet.recsys.model import SASRecConfig, build_sasrec, save_sasrec

    users, items = (int(v) for v in spec.split(","))
    prepare_interactions(None, root / "data", synthetic=(users, items), seed=0)
    data = RecData(root / "data")
    model = build_sasrec(SASRecConfig(num_items=data.num_items, hidden_size=64, num_layers=2, num_heads=2,
                                      max_len=50, dropout=0.0), seed=0)
    save_sasrec(model, root / "model", data.item_ids, extra={"dataset": data.identity()},
                tensors={"item_counts": torch.from_numpy(data.item_counts())})
    return root / "model", root / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--synthetic", help="USERS,ITEMS: a random-init model on a synthetic catalog")
    parser.add_argument("--rate", type=float, default=200.0, help="fixed-rate requests per second")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=64, help="saturation: connections")
    parser.add_argument("--connections", type=int, default=64, help="fixed rate: connections")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="rate", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--users-file", help=argparse.SUPPRESS)
    parser.add_argument("--key", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loadgen:
        loadgen(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.synthetic:
            model, data = synthetic_model(args.synthetic, root)
        elif args.model and args.data:
            model, data = args.model, args.data
        else:
            parser.error("give --model and --data, or --synthetic USERS,ITEMS")
        users_file = root / "users.json"
        users_file.write_text((data / "user_ids.json").read_text())
        catalog = len(json.loads((data / "item_ids.json").read_text()))
        best: dict[str, dict] = {}
        for round_ in range(args.rounds):
            for name, max_batch in (("batched", args.max_batch), ("batch1", 1)):
                proc, port = start_server(model, data, max_batch, args.max_wait_ms)
                try:
                    run_loadgen(port, users_file, "--mode", "saturate", "--seconds", "2", "--concurrency", "8")  # warm
                    rate = run_loadgen(port, users_file, "--mode", "rate", "--rate", str(args.rate), "--seconds",
                                       str(args.seconds), "--connections", str(args.connections))
                    sat = run_loadgen(port, users_file, "--mode", "saturate", "--seconds", str(args.seconds),
                                      "--concurrency", str(args.concurrency))
                finally:
                    stop_server(proc)
                record = {"side": name, "round": round_, "max_batch": max_batch, "catalog": catalog,
                          "rate": rate, "saturation": sat}
                print(json.dumps(record), flush=True)
                keep = best.setdefault(name, {"p99_ms": float("inf"), "p50_ms": float("inf"), "rps": 0.0})
                if rate["errors"] == 0 and rate["p99_ms"] < keep["p99_ms"]:
                    keep.update(p99_ms=rate["p99_ms"], p50_ms=rate["p50_ms"], achieved_rps=rate["achieved_rps"])
                if sat["errors"] == 0:
                    keep["rps"] = max(keep["rps"], sat["rps"])
        summary = {"catalog": catalog, "rate": args.rate, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
                   **{name: b for name, b in best.items()},
                   "saturation_ratio": best["batched"]["rps"] / best["batch1"]["rps"] if best["batch1"]["rps"] else None}
        print(f"catalog {catalog:,} items, {args.rate:g} req/s fixed rate:")
        for name, b in best.items():
            print(f"  {name:8s} p50 {b['p50_ms']:.2f} ms  p99 {b['p99_ms']:.2f} ms  saturation {b['rps']:.0f} req/s")
        print(f"  dynamic batching / batch 1 at saturation: {summary['saturation_ratio']:.2f}x")
        print(json.dumps(summary))
        if args.json_out:
            args.json_out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
