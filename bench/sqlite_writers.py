"""Writers of one gateway process on one SQLite file: queued on SQLite's busy handler against queued on the
process's own lock (``appliance.db.engine.writing``), side by side in one run.

A gateway process writes to its SQLite file from several threads at once: the audit writer's group commits,
the usage ledger's, budget lease settlements (every 500 ms; 50 ms when this was written), grants, checkpoints.
SQLite lets one writer in at a time; the others wait. This measures, for the same writers, how long a write
transaction takes from asking to commit (P50 / P99 / max) and how many commit per second, when they wait in
SQLite's busy handler (``engine.begin()``) and when they wait on ``writing``'s lock. Each round alternates the
two, on a fresh file.

The writers: ``--threads`` threads, half on an engine with serialized writes (the audit and budget stores),
half on a plain one (the ledger), each transaction inserting ``--rows`` rows with ``--hold-ms`` of Python work
inside it (hashing, building rows) and ``--pause-ms`` between transactions.

Usage: .venv/bin/python bench/sqlite_writers.py [--seconds 5] [--rounds 2] [--threads 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from appliance.db.engine import make_engine, writing

Begin = Callable[[Engine], AbstractContextManager[Connection]]


def measure(path: Path, begin: Begin, args: argparse.Namespace) -> tuple[list[float], int]:
    engines = [make_engine(f"sqlite:///{path}", serialized_writes=True), make_engine(f"sqlite:///{path}")]
    with engines[0].begin() as connection:
        connection.execute(text("CREATE TABLE t (x INTEGER, payload TEXT)"))
    took: list[float] = []
    errors = 0
    stop = time.monotonic() + args.seconds
    payload = "x" * 200

    def write(engine: Engine) -> None:
        nonlocal errors
        while time.monotonic() < stop:
            started = time.perf_counter()
            try:
                with begin(engine) as connection:
                    connection.execute(
                        text("INSERT INTO t VALUES (:x, :p)"), [{"x": i, "p": payload} for i in range(args.rows)]
                    )
                    time.sleep(args.hold_ms / 1000)
            except Exception:
                errors += 1
            took.append(time.perf_counter() - started)
            time.sleep(args.pause_ms / 1000)

    threads = [threading.Thread(target=write, args=(engines[n % 2],)) for n in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for engine in engines:
        engine.dispose()
    return took, errors


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--hold-ms", type=float, default=2.0)
    parser.add_argument("--pause-ms", type=float, default=5.0)
    args = parser.parse_args()
    ways: dict[str, Begin] = {"busy handler (engine.begin)": lambda engine: engine.begin(), "writing()": writing}
    results: dict[str, list[tuple[list[float], int]]] = {name: [] for name in ways}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            for name, begin in ways.items():
                results[name].append(
                    measure(Path(folder) / f"{round_}-{len(results[name])}-{name[:4]}.db", begin, args)
                )
    print(f"{args.threads} writers, {args.rows} rows and {args.hold_ms} ms of work per transaction, {args.seconds} s")
    print("| round | way | tx/s | P50 ms | P99 ms | max ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for round_ in range(args.rounds):
        for name in ways:
            took, errors = results[name][round_]
            print(
                f"| {round_ + 1} | {name} | {len(took) / args.seconds:.0f} | {statistics.median(took) * 1000:.1f} "
                f"| {quantile(took, 0.99):.1f} | {max(took) * 1000:.1f} | {errors} |"
            )


if __name__ == "__main__":
    main()
