"""A booted Debian 12 node for the install tests and bench/install.py (both import this module).

- The root is made with debootstrap once and kept as a tarball under /var/tmp/appliance-node-test, keyed by its
  package list; the wheelhouse is downloaded once, keyed by the requirement files' content; the media is copied
  and signed from those once per run.
- The node boots with systemd as PID 1 under systemd-nspawn, with one veth link to the host (the site network:
  the host plays a client machine at HOST_IP) and no route anywhere else. The whole nspawn process tree runs under
  `strace -f -e trace=connect`, so every connect() any process of the node makes is on record.
- `appliance install` converges it while it runs (the community.docker.nsenter connection), itself inside a
  network namespace with no network.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

WORK = Path("/var/tmp/appliance-node-test")
MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "systemd,systemd-sysv,systemd-timesyncd,dbus,python3,python3-venv,python3-dev,python3-cryptography,"
    "python3-cffi-backend,nftables,openssl,ca-certificates,iproute2,procps,libnuma1,libgomp1,gcc,g++,libc6-dev"
)
REPO = Path(__file__).resolve().parents[2]
ENGINE_REQUIREMENTS = REPO / "requirements" / "engine-cpu.txt"
CLI = [sys.executable, "-m", "appliance.cli"]

SUBNET = "10.77.0.0/24"
HOST_IP = "10.77.0.1"
NODE_IP = "10.77.0.2"
HOSTNAME = "node1.test"
MACHINE = "applnode"  # the host side of the veth is ve-applnode
VETH = f"ve-{MACHINE}"
PORT = 8080
PORT_BASE = 8101
MODELS = ["smollm2-135m-instruct", "minilm-l6-v2"]
NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def log(message: str) -> None:
    print(f"[node {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rootfs_tarball() -> Path:
    """A minimal Debian bookworm root with systemd (debootstrap once per package list)."""
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is missing (`make test` installs it)")
    WORK.mkdir(parents=True, exist_ok=True)
    tarball = WORK / f"rootfs-{_key(PACKAGES)}.tar"
    if tarball.exists():
        return tarball
    build = WORK / "debootstrap"
    shutil.rmtree(build, ignore_errors=True)
    started = time.monotonic()
    result = run(
        ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(build), MIRROR], timeout=1800
    )
    if result.returncode != 0:
        raise RuntimeError("debootstrap failed:\n" + result.stdout[-3000:] + result.stderr[-3000:])
    log(f"debootstrap in {time.monotonic() - started:.0f}s")
    partial = tarball.with_suffix(".partial")
    tar = run(["tar", "-C", str(build), "-cf", str(partial), "."])
    if tar.returncode != 0:
        raise RuntimeError(tar.stderr)
    partial.rename(tarball)
    shutil.rmtree(build)
    return tarball


def _appliance_dependencies() -> str:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return "\n".join(project["dependencies"])


def wheelhouse() -> Path:
    """Every wheel the node installs except the appliance's own (downloaded once per requirement set: the engines'
    requirement file and the appliance's dependencies). pip's configured find-links supplies the CPU torch wheel from
    local disk; PyPI's x86_64 torch is a CUDA build, which is refused here."""
    key = _key(ENGINE_REQUIREMENTS.read_text() + "\n--\n" + _appliance_dependencies())
    folder = WORK / f"wheels-{key}"
    if (folder / ".complete").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    requirements = folder / "appliance-dependencies.txt"
    requirements.write_text(_appliance_dependencies() + "\n")
    started = time.monotonic()
    result = run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--only-binary=:all:",
            "-q",
            "-d",
            str(folder),
            "-r",
            str(requirements),
            "-r",
            str(ENGINE_REQUIREMENTS),
        ],
        timeout=3600,
    )
    if result.returncode != 0:
        raise RuntimeError("downloading the wheelhouse failed:\n" + result.stderr[-3000:])
    requirements.unlink()
    torch = sorted(folder.glob("torch-*.whl"))
    if not torch or not all("+cpu" in path.name for path in torch):
        raise RuntimeError(f"the wheelhouse must carry the CPU torch wheel, found {[p.name for p in torch]}")
    (folder / ".complete").write_text(f"{time.monotonic() - started:.0f}s\n")
    log(f"wheelhouse downloaded in {time.monotonic() - started:.0f}s")
    return folder


def prepared_models() -> Path:
    """The bundled models, prepared (converted and verified) once in this harness's own cache folder."""
    from appliance.engines.manifest import MANIFEST_FILE, load_manifest
    from appliance.engines.models import ensure_prepared
    from appliance.settings import Settings

    settings = Settings(models_dir=REPO / "models", models_cache_dir=WORK / "models")
    python = REPO / ".venv-engine" / "bin" / "python"
    for name in MODELS:
        ensure_prepared(load_manifest(settings.models_dir / name / MANIFEST_FILE), settings, python)
    return settings.prepared_models_dir


def source_tree(out: Path, version: str) -> Path:
    """A copy of the project's tracked files whose version is ``version``: what newer media is built from."""
    listed = run(["git", "-C", str(REPO), "ls-files", "-z"])
    if listed.returncode != 0:
        raise RuntimeError("the node tests build newer media from the git checkout: " + listed.stderr)
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO / name
        if source.is_file():
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    project = out / "pyproject.toml"
    text, count = re.subn(r'(?m)^version = "[^"]+"$', f'version = "{version}"', project.read_text(), count=1)
    if count != 1:
        raise RuntimeError("pyproject.toml has no version line")
    project.write_text(text)
    return out


def build_media(out: Path, version: str | None = None, keys: Path | None = None) -> tuple[Path, Path, float]:
    """(media folder, public key, seconds): signed media with the appliance, every wheel and both models. With
    ``version``, the appliance is built from a copy of the project carrying that version (newer media); with
    ``keys``, that folder's signing key signs it (the site trusts one key)."""
    wheels = wheelhouse()
    models = prepared_models()
    if keys is None:
        keys = out / "keys"
        result = run([*CLI, "media", "keygen", "--out", str(keys)])
        if result.returncode != 0:
            raise RuntimeError(result.stderr)
    project = REPO if version is None else source_tree(out / "source", version)
    started = time.monotonic()
    args = [
        *CLI,
        "media",
        "build",
        "--out",
        str(out / "media"),
        "--signing-key",
        str(keys / "media-signing-key.pem"),
        "--wheels",
        str(wheels),
    ]
    for name in MODELS:
        args += ["--model", name]
    # `python -m appliance.cli` run from a project folder builds that folder's appliance (its own REPO_ROOT).
    env = dict(os.environ, APPLIANCE_MODELS_CACHE_DIR=str(models))
    result = run(args, env=env, timeout=1800, cwd=project)
    if result.returncode != 0:
        raise RuntimeError("media build failed:\n" + result.stderr[-3000:])
    seconds = time.monotonic() - started
    log(f"media built in {seconds:.0f}s")
    return out / "media", keys / "media-signing-key.pub.pem", seconds


class Node:
    """One booted node: its root folder, the nspawn process under strace, and the container's PID 1."""

    def __init__(self, root: Path, logs: Path) -> None:
        self.root, self.logs = root, logs
        self.process: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.boots = 0
        self.traces: list[Path] = []

    # --- the root -------------------------------------------------------------------------------------------
    def create(self, tarball: Path) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        result = run(["tar", "-C", str(self.root), "-xf", str(tarball)])
        if result.returncode != 0:
            raise RuntimeError(result.stderr)
        etc = self.root / "etc"
        (etc / "hostname").write_text(f"{HOSTNAME}\n")
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{NODE_IP} {HOSTNAME} {HOSTNAME.split('.')[0]}\n")
        (etc / "resolv.conf").unlink(missing_ok=True)
        (etc / "resolv.conf").write_text("# no name server: the node resolves nothing\n")
        network = etc / "systemd" / "network"
        network.mkdir(parents=True, exist_ok=True)
        # The site network: the host at HOST_IP; a default route through it, so that only the node's firewall
        # stops a connection to an address outside the subnet (the host forwards nothing). Named to sort before
        # the image's own 80-container-host0.network (DHCP and link-local addresses).
        (network / "10-host0.network").write_text(
            f"[Match]\nName=host0\n\n[Network]\nAddress={NODE_IP}/24\nGateway={HOST_IP}\n"
            "LinkLocalAddressing=no\nIPv6AcceptRA=no\n"
        )
        for command in (
            ["systemctl", f"--root={self.root}", "enable", "systemd-networkd.service"],
            [
                "systemctl",
                f"--root={self.root}",
                "mask",
                "systemd-networkd-wait-online.service",
                "console-getty.service",
                "getty@tty1.service",
            ],
        ):
            result = run(command)
            if result.returncode != 0:
                raise RuntimeError(f"{command}: {result.stderr}")

    # --- boot and stop --------------------------------------------------------------------------------------
    def boot(self, timeout: float = 300) -> float:
        """Boot and wait until systemd says the system is up; the seconds it took."""
        started = time.monotonic()
        self.boots += 1
        trace = self.logs / f"connect-trace-{self.boots}.txt"
        self.traces.append(trace)
        console = (self.logs / f"console-{self.boots}.txt").open("wb")
        self.process = subprocess.Popen(
            [
                "strace",
                "-f",
                "--seccomp-bpf",
                "-qq",
                "-e",
                "trace=connect",
                "-e",
                "signal=none",
                "-o",
                str(trace),
                "systemd-nspawn",
                "-D",
                str(self.root),
                f"--machine={MACHINE}",
                "--register=no",
                "--keep-unit",
                "--network-veth",
                "--resolv-conf=off",
                "--timezone=off",
                "--link-journal=no",
                "--console=read-only",
                "--boot",
            ],
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        console.close()
        self.pid = self._wait_for_init(timeout)
        deadline = time.monotonic() + timeout
        while run(["ip", "link", "show", VETH]).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{VETH} never appeared")
            time.sleep(0.2)
        run(["ip", "addr", "replace", f"{HOST_IP}/24", "dev", VETH])
        run(["ip", "link", "set", VETH, "up"])
        while f"inet {NODE_IP}/" not in self.run(["ip", "-o", "-4", "addr", "show", "host0"]).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node never got {NODE_IP}")
            time.sleep(0.2)
        state = self.run(["systemctl", "is-system-running", "--wait"], timeout=timeout)
        if state.stdout.strip() not in ("running", "degraded"):
            raise RuntimeError(f"the node did not come up: {state.stdout} {state.stderr}")
        if state.stdout.strip() == "degraded":
            failed = self.run(["systemctl", "--failed", "--no-legend"]).stdout
            log(f"boot {self.boots}: degraded: {failed}")
        seconds = time.monotonic() - started
        log(f"boot {self.boots}: up in {seconds:.1f}s (PID 1 is {self.pid} on the host)")
        return seconds

    def _wait_for_init(self, timeout: float) -> int:
        """The container's PID 1 as the host sees it: a descendant of our nspawn whose innermost pid is 1."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited ({self.process.returncode}); see {self.logs}")
            for status in Path("/proc").glob("[0-9]*/status"):
                try:
                    text = status.read_text()
                except OSError:
                    continue
                match = re.search(r"^NSpid:\s+(\d+)\s+1\s*$", text, re.MULTILINE)
                if match and self._descends_from(int(match[1]), self.process.pid):
                    return int(match[1])
            time.sleep(0.2)
        raise RuntimeError("the container's PID 1 never appeared")

    @staticmethod
    def _descends_from(pid: int, ancestor: int) -> bool:
        while pid > 1:
            if pid == ancestor:
                return True
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                return False
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        return False

    def poweroff(self, timeout: float = 180) -> float:
        """A clean shutdown (systemd stops every unit); the seconds it took."""
        started = time.monotonic()
        if self.process is None or self.process.poll() is not None:
            return 0.0
        self.run(["systemctl", "poweroff", "--no-block"])
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
            raise RuntimeError("the node did not power off in time") from None
        finally:
            self.pid = 0
        return time.monotonic() - started

    def destroy(self) -> None:
        try:
            self.poweroff()
        finally:
            if self.process is not None and self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)

    # --- inside ---------------------------------------------------------------------------------------------
    def run(
        self, args: list[str], user: str | None = None, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """A command inside the node (all its namespaces), as root or as ``user``, with a clean environment."""
        if not self.pid:
            raise RuntimeError("the node is not running")
        prefix = ["nsenter", f"--target={self.pid}", "--all", "--"]
        if user:
            prefix += ["runuser", "-u", user, "--"]
        env = {"PATH": NODE_PATH, "LANG": "C.UTF-8", "HOME": "/root"}
        return run([*prefix, *args], timeout=timeout, env=env, input=input, cwd="/")

    def cli(self, *args: str, user: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.run(["/opt/appliance/venv/bin/appliance", *args], user=user, timeout=timeout)

    def read(self, path: str) -> str:
        return (self.root / path.lstrip("/")).read_text()

    # --- install --------------------------------------------------------------------------------------------
    def inventory(self, folder: Path, **extra: Any) -> Path:
        data = {
            "appliance": {
                "hosts": {
                    "node1": {
                        "ansible_connection": "community.docker.nsenter",
                        "ansible_host": HOSTNAME,
                        "ansible_nsenter_pid": self.pid,
                        "ansible_python_interpreter": "/usr/bin/python3",
                        "ansible_become": False,
                    }
                },
                "vars": {
                    "appliance_subnet": SUBNET,
                    "preflight_min_memory_mb": 2048,
                    "preflight_min_disk_gb": 8,
                    "vllm_models": [{"name": name} for name in MODELS],
                    "vllm_port_base": PORT_BASE,
                    "vllm_kv_cache_gib": 1,
                    "pki_hostnames": [HOSTNAME],
                    "pki_addresses": ["127.0.0.1", NODE_IP],
                    "base_ntp_servers": [HOST_IP],
                    **extra,
                },
            }
        }
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "inventory.yml"
        path.write_text(yaml.safe_dump(data))
        return path

    def install(self, media: Path, pubkey: Path, folder: Path, **extra: Any) -> Install:
        """`appliance install` of ``media`` onto the running node, from a network namespace with no network."""
        inventory = self.inventory(folder, **extra)
        command = [
            "unshare",
            "--net",
            "--",
            *CLI,
            "install",
            "--media",
            str(media),
            "-i",
            str(inventory),
            "--pubkey",
            str(pubkey),
            "--json",
        ]
        env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "TMPDIR") if key in os.environ}
        started = time.monotonic()
        result = run(command, timeout=2400, cwd=REPO, env=env)
        seconds = time.monotonic() - started
        output = result.stdout + result.stderr
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"install-{int(time.time())}.log").write_text(output)
        lines = result.stdout.strip().splitlines()
        recap = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
        log(f"appliance install: rc {result.returncode} in {seconds:.0f}s, changed {recap.get('changed')}")
        return Install(result.returncode, recap, output, seconds)


class Install:
    def __init__(self, rc: int, recap: dict[str, Any], output: str, seconds: float) -> None:
        self.rc, self.recap, self.output, self.seconds = rc, recap, output, seconds

    @property
    def ok(self) -> bool:
        return self.rc == 0 and self.recap.get("rc") == 0 and not self.recap.get("failures")

    @property
    def changed(self) -> int:
        return int(dict(self.recap.get("changed") or {}).get("node1", 0))

    def changed_tasks(self) -> list[str]:
        """The names of the tasks that reported a change (for a useful failure message)."""
        found, task = [], ""
        for line in self.output.splitlines():
            if line.startswith(("TASK [", "RUNNING HANDLER [")):
                task = line
            elif line.startswith("changed:"):
                found.append(task)
        return found


CONNECT = re.compile(r"^(?P<pid>\d+)\s+connect\((?P<fd>\d+), \{sa_family=(?P<family>AF_\w+)(?P<rest>.*)$")


def outside_connects(trace: Path, allowed: str = SUBNET) -> list[str]:
    """connect() calls in a strace file to an address outside loopback and ``allowed`` (AF_UNIX and AF_NETLINK are
    local)."""
    subnet = ipaddress.ip_network(allowed)
    found = []
    for line in trace.read_text(errors="replace").splitlines():
        match = CONNECT.match(line)
        if not match or match["family"] in ("AF_UNIX", "AF_NETLINK", "AF_UNSPEC"):
            continue
        address = re.search(r'inet_(?:addr|pton)\((?:AF_INET6, )?"([^"]+)"', match["rest"])
        if address is None:
            found.append(line)
            continue
        ip = ipaddress.ip_address(address[1])
        mapped = getattr(ip, "ipv4_mapped", None)
        ip = mapped or ip
        if ip.is_loopback or ip.is_unspecified or (ip.version == subnet.version and ip in subnet):
            continue
        found.append(line)
    return found


def connects(trace: Path) -> int:
    return sum(1 for line in trace.read_text(errors="replace").splitlines() if CONNECT.match(line))


def http_client(cafile: Path, timeout: float = 120) -> Any:
    """An httpx client that reaches https://node1.test:PORT at NODE_IP (no /etc/hosts entry: the name is mapped in
    the connection pool) and trusts only the node's CA; TLS checks the certificate against the name node1.test."""
    import ssl

    import httpcore
    import httpx

    class NodeNames(httpcore.SyncBackend):
        def connect_tcp(self, host: str, port: int, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
            return super().connect_tcp(NODE_IP if host == HOSTNAME else host, port, *args, **kwargs)

    class Transport(httpx.HTTPTransport):
        def __init__(self) -> None:
            super().__init__()
            self._pool = httpcore.ConnectionPool(
                ssl_context=ssl.create_default_context(cafile=str(cafile)), network_backend=NodeNames()
            )

    return httpx.Client(transport=Transport(), timeout=timeout)


def node_ca(node: Node, folder: Path) -> Path:
    """The node's CA certificate, copied out to the host (a client machine trusts it)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "node-ca.crt"
    path.write_text(node.read("/etc/appliance/pki/ca.crt"))
    return path


def create_key(node: Node, tenant: str = "acme", workflow: str = "support") -> str:
    result = node.cli("admin", "create-key", "--tenant", tenant, "--workflow", workflow, "--create", user="appliance")
    if result.returncode != 0:
        raise RuntimeError(f"create-key on the node failed: {result.stderr}")
    return str(json.loads(result.stdout.strip().splitlines()[-1])["key"])


def first_chat(cafile: Path, key: str, deadline_s: float) -> float:
    """Seconds until a chat completion through the gateway answers (for bench/install.py)."""
    import openai

    started = time.monotonic()
    client = openai.OpenAI(base_url=f"https://{HOSTNAME}:{PORT}/v1", api_key=key, http_client=http_client(cafile))
    while True:
        try:
            client.chat.completions.create(
                model=MODELS[0], messages=[{"role": "user", "content": "Say hi."}], max_tokens=4
            )
            return time.monotonic() - started
        except openai.APIError:
            if time.monotonic() - started > deadline_s:
                raise
            time.sleep(2)
