"""Starting, probing and stopping vLLM engine processes (the dev runner; systemd does this on a node)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.engines.manifest import ModelManifest, load_manifests
from appliance.lib.errors import ApplianceError
from appliance.settings import REPO_ROOT, EngineRoute, Settings

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


class EngineStartError(ApplianceError):
    code = "engine_start_failed"


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """One engine process; ``name`` is the model, with ``-N`` for its N-th extra replica (the unit's name on a
    node is ``vllm-<name>.service``)."""

    manifest: ModelManifest
    model_dir: Path
    host: str
    port: int
    log_path: Path
    name: str = ""
    args: tuple[str, ...] = ()  # the version's serving options as vLLM arguments (appliance.registry.options)
    env: tuple[tuple[str, str], ...] = ()  # ... and environment

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def route(self) -> EngineRoute:
        return EngineRoute(model=self.manifest.name, url=self.url, runner=self.manifest.runner)


def configured_specs(settings: Settings) -> list[EngineSpec]:
    """Every engine of ``[engines]``: what the supervisor starts, the units exec, status watches and the
    gateway routes to."""
    return engine_specs(settings, load_manifests(settings.models_dir, settings.engines.models))


def engine_routes(settings: Settings) -> list[EngineRoute]:
    """The gateway's routes on a node whose engines systemd runs: one per engine of ``[engines]``, on the ports
    :func:`engine_specs` gives them (the same function the engine units start from)."""
    return [spec.route for spec in configured_specs(settings)]


def engine_python(settings: Settings) -> Path:
    venv = settings.engines.venv or REPO_ROOT / ".venv-engine"
    python = venv / "bin" / "python"
    if not python.exists():
        raise EngineStartError(f"no engine environment at {venv}: run `make setup` (or set APPLIANCE_ENGINES__VENV)")
    return python


def engine_specs(settings: Settings, manifests: list[ModelManifest]) -> list[EngineSpec]:
    """One engine per model, or ``engines.replicas[model]`` of them, on consecutive ports."""
    specs: list[EngineSpec] = []
    for manifest in manifests:
        for replica in range(max(1, settings.engines.replicas.get(manifest.name, 1))):
            suffix = f"-{replica}" if replica else ""
            specs.append(
                EngineSpec(
                    manifest=manifest,
                    model_dir=settings.prepared_models_dir / manifest.name,
                    host=settings.engines.host,
                    port=settings.engines.port_base + len(specs),
                    log_path=settings.data_dir / "logs" / f"engine-{manifest.name}{suffix}.log",
                    name=f"{manifest.name}{suffix}",
                )
            )
    return specs


def engine_command(spec: EngineSpec, python: Path, settings: Settings) -> list[str]:
    command = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(spec.model_dir),
        "--served-model-name",
        spec.manifest.name,
        "--host",
        spec.host,
        "--port",
        str(spec.port),
        "--max-model-len",
        str(spec.manifest.context_length),
        "--disable-uvicorn-access-log",
    ]
    if spec.manifest.runner == "pooling":
        command += ["--runner", "pooling"]
    if spec.manifest.tool_call_parser is not None:
        command += ["--enable-auto-tool-choice", "--tool-call-parser", spec.manifest.tool_call_parser]
    if spec.manifest.reasoning_parser is not None:
        command += ["--reasoning-parser", spec.manifest.reasoning_parser]
    dtype = settings.engines.dtype or cpu_dtype()
    if dtype is not None and "--dtype" not in spec.args:
        command += ["--dtype", dtype]
    return command + list(spec.args) + list(settings.engines.extra_args)


def cpu_dtype(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The engines' dtype on a node without a GPU (None with one: vLLM chooses).

    vLLM's CPU backend picked float16 for the embedding model, which x86 CPUs emulate: 32 chunks of 212
    tokens took 8.2 s on this project's machine, against 1.8 s in float32 and 1.05 s in bfloat16 (the CPU has
    AVX-512 BF16). So bfloat16 where the CPU computes it, float32 elsewhere."""
    if shutil.which("nvidia-smi") is not None:
        return None
    try:
        flags = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return "float32"
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def cpu_binding(runner: str, index: int, configured: list[str], cpus: int) -> str | None:
    """Cores for one CPU engine's OpenMP threads (``VLLM_CPU_OMP_THREADS_BIND``).

    vLLM's automatic binding puts every engine on the same core(s); on a 2-core machine the chat and the
    embedding engine then contend for core 0 and short chats stall for about a second now and then
    (measured with bench/gateway_overhead.py: chat P99 1.45 s -> 0.75 s, embeddings P99 1.05 s -> 0.08 s
    once separated). Default: the last core for pooling (embedding) engines, the others for generation."""
    if configured:
        return configured[index % len(configured)]
    if cpus < 2:
        return None
    if runner == "pooling":
        return str(cpus - 1)
    return "0" if cpus == 2 else f"0-{cpus - 2}"


def offline_env() -> dict[str, str]:
    """The environment of any process run with the engines' Python: offline, and without the appliance's
    own virtual environment leaking into it."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(OFFLINE_ENV)
    return env


def vllm_cache_root(env: dict[str, str]) -> Path:
    """Where vLLM keeps its compile cache in a process with this environment (vLLM's own rule: VLLM_CACHE_ROOT, else
    $XDG_CACHE_HOME/vllm, else ~/.cache/vllm)."""
    if env.get("VLLM_CACHE_ROOT"):
        return Path(env["VLLM_CACHE_ROOT"]).expanduser()
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    cache = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else home / ".cache"
    return cache / "vllm"


def engine_env(settings: Settings, spec: EngineSpec, index: int) -> dict[str, str]:
    env = offline_env()
    env.update(spec.env)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.engines.kv_cache_gib))
    # vLLM finds its own address by connecting a UDP socket to 8.8.8.8 (and Google's IPv6 resolver) unless told;
    # torch's gloo picks an interface the same way. Both stay on the engine's own address (seen with strace).
    env["VLLM_HOST_IP"] = spec.host
    env["GLOO_SOCKET_IFNAME"] = "lo"
    # vLLM 0.32 with torch 2.13 saves its compiled model as an AOT artifact that it then fails to load ("'function'
    # object has no attribute 'finalize_loading'"), so every start compiled the model again: 78-83 s of a chat
    # engine's start on this project's machine. Without AOT, Inductor's own cache is read back: 17 s (one run
    # each; measured on CPU, unverified on a GPU node, where it costs at most a Dynamo trace per start).
    env.setdefault("VLLM_USE_AOT_COMPILE", "0")
    # Inductor's cache (compiled graphs and kernels) defaults to /tmp/torchinductor_<user>, which the node's engine
    # units (PrivateTmp) lose at every stop: it is kept beside vLLM's own compile cache instead. Torch still builds
    # its precompiled C++ header under /tmp whatever this says (about 2-3 s of a start, rebuilt on a node).
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(vllm_cache_root(env) / "torchinductor"))
    if spec.manifest.runner == "generate":
        # The Responses API's `store` and `previous_response_id` (kept in the engine's memory; the gateway keeps
        # which tenant owns each id, see appliance.gateway.owners).
        env["VLLM_ENABLE_RESPONSES_API_STORE"] = "1"
    if spec.manifest.runner == "pooling":
        # glibc raises its mmap threshold each time a large block is freed; past that, an embedding worker's
        # tensors of ever-different sizes come from the heap and fragment it. Its resident memory grew by 41 % in
        # a 30-minute soak (bench/soak.py) and by 700 MiB in 5 minutes of embeddings alone; with the threshold
        # fixed, it stayed within 40 MiB of 1.3 GiB, for about 8 % fewer embeddings a second (one run each).
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(256 * 1024))
        # oneDNN keeps a compiled primitive for each batch shape it met (1,024 by default), and batches of
        # embeddings come in every token count: the worker climbed from 766 to 1,078 MiB in 2 minutes of batches of
        # 1-64 inputs; with 8 kept it stayed at 802 MiB, for the same embeddings a second (one run each).
        env.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")
    binding = cpu_binding(spec.manifest.runner, index, settings.engines.cpu_binding, len(os.sched_getaffinity(0)))
    if binding is not None:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", binding)
    return env


def start_engine(spec: EngineSpec, python: Path, settings: Settings, index: int) -> subprocess.Popen[bytes]:
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    with spec.log_path.open("ab") as log:
        return subprocess.Popen(
            engine_command(spec, python, settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=engine_env(settings, spec, index),
            start_new_session=True,  # its own process group: stopping it stops its engine-core child too
        )


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback URL we built)
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(
    url: str,
    timeout_s: float,
    process: subprocess.Popen[bytes] | None = None,
    what: str = "engine",
    cancelled: Callable[[], bool] | None = None,
) -> None:
    """Until ``url`` answers 200; returns early (healthy or not) once ``cancelled()`` is true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cancelled is not None and cancelled():
            return
        if process is not None and process.poll() is not None:
            raise EngineStartError(f"{what} exited with status {process.returncode} while starting")
        if http_ok(url):
            return
        time.sleep(1.0)
    raise EngineStartError(f"{what} at {url} was not healthy after {timeout_s:.0f}s")


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def stop_group(pid: int, timeout_s: float = 30.0) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL what is left after ``timeout_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + (timeout_s if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            if not _group_alive(pid):
                return
            time.sleep(0.2)


def stop_process(pid: int, timeout_s: float = 30.0) -> None:
    """SIGTERM one process (whatever its group), wait until it has ended, SIGKILL it after ``timeout_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + (timeout_s if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            try:  # our own child is reaped, or it would stay a zombie
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not pid_alive(pid):
                return
            time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Reap our own child if it is the leader (otherwise it stays a zombie and the group looks alive).
    try:
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    return any(pid_alive(pid) for pid in _group_members(pgid))


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members
