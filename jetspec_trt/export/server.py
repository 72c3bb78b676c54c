"""`jetspec-trt serve REPO`: the real Triton Inference Server over a model repository written by `export triton`.

The server is the `tritonserver` binary (2.51, python backend, runs on CPU) shipped in the `nvidia-pytriton`
wheel (`pip install 'jetspec-trt[serve]'`). Running it needs what pytriton itself arranges:
  - LD_LIBRARY_PATH: the wheel's `nvidia_pytriton.libs` (and this interpreter's libpython directory);
  - a backend directory whose `python/` holds the wheel's python backend plus the stub built for THIS Python
    version (`python_backend_stubs/<major.minor>/triton_python_backend_stub`): a private copy in a temp dir,
    since site-packages may be read-only;
  - this environment's `bin` first on PATH: the stub's embedded Python finds its site-packages (and so
    jetspec_trt and torch) through the `python3` it sees there.
The child runs in its own session, so stopping it (SIGTERM, then SIGKILL of the whole group after a grace
period) also ends its python stub processes.

`serve` also watches the models: Triton 2.51 does not restart a python model's stub process that dies (kill -9,
the OOM killer, a crash in native code), and keeps answering ready on every health endpoint while each request to
that model fails ("Stub process ... is not healthy"); unloading such a model never finishes once a request has
failed on it. So `serve` checks every instance stub's process each second, and when one has died restarts
tritonserver (a fresh process loads every model again), at most --max-restarts times within --restart-window
seconds; past that, or when the restarted server does not become ready, it stops and exits non-zero with one
line on stderr, for a supervisor to act on. It exits 0 only when a signal stopped it and tritonserver exited 0.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import click

from jetspec_trt.errors import JetSpecError

INSTALL_HINT = "install the serve extra: pip install 'jetspec-trt[serve]'"


@dataclass(frozen=True)
class TritonDistribution:
    binary: Path
    libs: Path
    python_backend: Path  # libtriton_python.so + triton_python_backend_utils.py
    stub: Path


def find_tritonserver() -> TritonDistribution:
    """Locate tritonserver and the python backend stub for this Python inside the installed pytriton wheel."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise JetSpecError(f"nvidia-pytriton (which ships tritonserver) is not installed; {INSTALL_HINT}")
    root = Path(list(spec.submodule_search_locations)[0])
    dist = root / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = TritonDistribution(dist / "bin" / "tritonserver", root.parent / "nvidia_pytriton.libs",
                               dist / "backends" / "python",
                               dist / "python_backend_stubs" / version / "triton_python_backend_stub")
    if not found.binary.is_file() or not found.libs.is_dir() or not found.python_backend.is_dir():
        raise JetSpecError(f"{root}: no tritonserver in this pytriton install; {INSTALL_HINT}")
    if not found.stub.is_file():
        raise JetSpecError(f"pytriton has no python backend stub for Python {version} (it ships 3.8-3.13)")
    return found


def _python_libdir() -> list[str]:
    """This interpreter's libpython directory, so the stub embeds the same Python as the environment."""
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    return [libdir] if libdir and soname and (Path(libdir) / soname).is_file() else []


def _free_host(address: str) -> str:
    return "127.0.0.1" if address in ("0.0.0.0", "") else ("::1" if address == "::" else address)


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on; None where the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


@dataclass(frozen=True)
class StubProcess:
    """One model instance's python backend stub: a child process of tritonserver."""

    pid: int
    start_time: str  # /proc/PID/stat field 22: tells a reused pid apart
    model: str
    instance: str

    def death(self) -> str | None:
        """None while the stub runs; else how it ended, e.g. "killed by SIGKILL"."""
        fields = _proc_stat(self.pid)
        if fields is None or fields[19] != self.start_time:
            return "exited"
        if fields[0] not in ("Z", "X"):
            return None
        if len(fields) > 49 and fields[49].isdigit():  # field 52, the wait status (Linux >= 3.5)
            status = int(fields[49])
            if status & 0x7F:
                with contextlib.suppress(ValueError):
                    return f"killed by {signal.Signals(status & 0x7F).name}"
                return f"killed by signal {status & 0x7F}"
            return f"exited with code {status >> 8}"
        return "exited"


class TritonServer:
    """One tritonserver child process over `repo`: start(), wait_ready(), stop(); also a context manager."""

    def __init__(self, repo: Path | str, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 address: str = "0.0.0.0", log: IO | None = None, log_verbose: int = 0, exit_timeout: int = 30):
        self.repo = Path(repo)
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.address = address
        self.log = log  # None: the child writes to our stdout/stderr
        self.log_verbose = log_verbose
        self.exit_timeout = exit_timeout  # tritonserver's --exit-timeout-secs: in-flight requests' time on SIGTERM
        self.process: subprocess.Popen | None = None
        self.workdir: Path | None = None
        self.killed = False  # the last stop() had to SIGKILL the server
        self.shm_prefix = f"jetspec{os.getpid()}x{secrets.token_hex(4)}"

    @property
    def endpoints(self) -> dict[str, str]:
        host = _free_host(self.address)
        host = f"[{host}]" if ":" in host else host
        return {"http": f"http://{host}:{self.http_port}", "grpc": f"{host}:{self.grpc_port}",
                "metrics": f"http://{host}:{self.metrics_port}/metrics"}

    def _check_repo(self) -> None:
        if not self.repo.is_dir():
            raise JetSpecError(f"model repository {self.repo} does not exist")
        if not any(self.repo.glob("*/config.pbtxt")):
            raise JetSpecError(f"{self.repo}: no <model>/config.pbtxt (write one with `jetspec-trt export triton`)")
        for name, port in (("--http-port", self.http_port), ("--grpc-port", self.grpc_port),
                           ("--metrics-port", self.metrics_port)):
            if not 1 <= port <= 65535:
                raise JetSpecError(f"{name} must be in 1..65535, got {port}")
        if len({self.http_port, self.grpc_port, self.metrics_port}) != 3:
            raise JetSpecError("--http-port, --grpc-port and --metrics-port must differ")
        if self.exit_timeout < 1:
            raise JetSpecError(f"--stop-timeout must be >= 1, got {self.exit_timeout}")

    def command(self, dist: TritonDistribution, backends: Path) -> list[str]:
        return [
            str(dist.binary), f"--model-repository={self.repo.resolve()}", f"--backend-directory={backends}",
            f"--http-address={self.address}", f"--http-port={self.http_port}",
            f"--grpc-address={self.address}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.address}", f"--metrics-port={self.metrics_port}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--exit-on-error=true", "--strict-readiness=true", f"--exit-timeout-secs={self.exit_timeout}",
            f"--log-verbose={self.log_verbose}",
        ]

    def environment(self, dist: TritonDistribution) -> dict[str, str]:
        env = dict(os.environ)
        libs = [str(dist.libs), *_python_libdir()]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in [env.get("LD_LIBRARY_PATH", "")] if p])
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def start(self) -> "TritonServer":
        if self.process is not None:
            raise JetSpecError("this server is already started")
        self._check_repo()
        dist = find_tritonserver()
        self.workdir = Path(tempfile.mkdtemp(prefix="jetspec-triton-"))
        try:
            backend = self.workdir / "backends" / "python"
            shutil.copytree(dist.python_backend, backend, ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy2(dist.stub, backend / "triton_python_backend_stub")
            self.process = subprocess.Popen(
                self.command(dist, self.workdir / "backends"), env=self.environment(dist), stdin=subprocess.DEVNULL,
                stdout=self.log, stderr=subprocess.STDOUT if self.log is not None else None,
                start_new_session=True)
        except BaseException:
            self._cleanup()
            raise
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoints['http']}/v2/health/ready", timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Return once /v2/health/ready answers 200; JetSpecError if the server exits or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                self.stop()
                raise JetSpecError(f"tritonserver exited with code {code} before it was ready (see its log)")
            if self.ready():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise JetSpecError(f"tritonserver was not ready within {timeout:g} s")
            time.sleep(0.25)

    def stub_path(self) -> Path | None:
        """The stub binary of this start (unique to it: the private backend directory)."""
        return None if self.workdir is None else self.workdir / "backends" / "python" / "triton_python_backend_stub"

    def stubs(self) -> list[StubProcess]:
        """The running python-backend stubs of the model instances (not the short-lived auto-complete stubs)."""
        binary = self.stub_path()
        if binary is None:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].decode(errors="replace") != str(binary) or len(argv) < 9:
                continue
            # argv: stub, <model dir>/<version>/model.py, shm region, shm sizes (2), parent pid, backend dir,
            # ipc handle, instance name, ...
            model = Path(argv[1].decode(errors="replace")).parent.parent.name
            instance = argv[8].decode(errors="replace")
            fields = _proc_stat(int(entry.name))
            if fields is not None and fields[0] not in ("Z", "X") and instance != model:
                found.append(StubProcess(int(entry.name), fields[19], model, instance))
        return sorted(found, key=lambda stub: stub.instance)

    def stop(self, grace: float | None = None) -> int | None:
        """SIGTERM the server, wait up to `grace` s (default: its exit timeout + 10 s), then SIGKILL its whole
        process group (setting `killed`). Returns its exit code."""
        grace = self.exit_timeout + 10.0 if grace is None else grace
        process, code = self.process, None
        if process is not None:
            self.killed = False
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self.killed = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # stubs left behind, or a server that did not stop
            code = process.wait(timeout=10)
            self.process = None
        self._cleanup()
        return code

    def _cleanup(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            with contextlib.suppress(OSError):
                region.unlink()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


WATCH_INTERVAL_S = 1.0  # how often serve checks tritonserver and the model stubs
RESTART_GRACE_S = 5.0  # in-flight requests' time when serve restarts or gives up (a dead model's never finish)
# What tritonserver's exit code 1 while stopping means (its log: "Exit timeout expired"), and the cause seen so far.
# (With a request still decoding, tritonserver 2.51 logged the same but then hung until serve killed it, 2026-12-05.)
STOPPED_LATE = ("; --stop-timeout ({} s) ran out with a model still loaded (e.g. one that tritonserver 2.51 keeps "
                "loaded after a gRPC stream was cancelled just as its first request finished: docs/triton.md, Clients)")


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated()


def _say(message: str) -> None:
    click.echo(message, err=True)


class Supervisor:
    """Keeps one TritonServer serving: `run()` returns only by exception (JetSpecError: serving failed; or the
    signal handler's). A model instance whose python stub dies gets tritonserver restarted, at most `max_restarts`
    times within `restart_window` seconds."""

    def __init__(self, server: TritonServer, ready_timeout: float, max_restarts: int = 1,
                 restart_window: float = 300.0):
        self.server, self.ready_timeout = server, ready_timeout
        self.max_restarts, self.restart_window = max_restarts, restart_window
        self.restarts: collections.deque[float] = collections.deque()  # monotonic times of recent restarts
        self.watched: list[StubProcess] = []

    def start(self) -> None:
        self.server.start()
        self.server.wait_ready(self.ready_timeout)
        self.watched = self.server.stubs()
        urls = self.server.endpoints
        watched = ", ".join(f"{stub.instance} (pid {stub.pid})" for stub in self.watched) or "none"
        _say(f"serving {self.server.repo}: HTTP {urls['http']}  gRPC {urls['grpc']}  metrics {urls['metrics']}  "
             f"(Ctrl-C to stop; watching python stubs: {watched})")

    def run(self) -> None:
        while True:
            try:
                code = self.server.process.wait(timeout=WATCH_INTERVAL_S)
            except subprocess.TimeoutExpired:
                code = None
            if code is not None:
                raise JetSpecError(f"tritonserver exited on its own with code {code}")
            for stub in self.watched:
                how = stub.death()
                if how is not None:
                    self.restart(f"model '{stub.model}' instance {stub.instance} died (python stub pid {stub.pid} "
                                 f"{how}); Triton does not restart it and every request to the model fails")
                    break

    def restart(self, what: str) -> None:
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > self.restart_window:
            self.restarts.popleft()
        if len(self.restarts) >= self.max_restarts:
            self.server.stop(RESTART_GRACE_S)
            if self.max_restarts == 0:
                raise JetSpecError(f"{what}; --max-restarts is 0, so serve stops")
            raise JetSpecError(f"{what}; tritonserver was already restarted {len(self.restarts)} time(s) in the "
                               f"last {self.restart_window:g} s (--max-restarts {self.max_restarts}), so serve stops")
        self.restarts.append(now)
        _say(f"{what}; restarting tritonserver (restart {len(self.restarts)} of {self.max_restarts} allowed within "
             f"{self.restart_window:g} s)")
        code = self.server.stop(RESTART_GRACE_S)
        _say(f"tritonserver stopped for the restart (exit code {code})")
        try:
            self.start()
        except JetSpecError as err:
            raise JetSpecError(f"{what}; the restart failed: {err}") from None


@click.command("serve")
@click.argument("repo", type=click.Path(path_type=Path))
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--metrics-port", type=int, default=8002, show_default=True)
@click.option("--address", default="0.0.0.0", show_default=True, help="Address all three endpoints bind to.")
@click.option("--ready-timeout", type=float, default=600.0, show_default=True,
              help="Seconds to wait for the models to load (at start and at a restart).")
@click.option("--stop-timeout", type=int, default=30, show_default=True,
              help="Seconds in-flight requests get on Ctrl-C / SIGTERM (tritonserver's --exit-timeout-secs); "
                   "tritonserver is killed 10 s later.")
@click.option("--max-restarts", type=int, default=1, show_default=True,
              help="tritonserver restarts allowed within --restart-window after a model's python stub dies; "
                   "0 = exit at the first death.")
@click.option("--restart-window", type=float, default=300.0, show_default=True,
              help="Seconds over which --max-restarts counts.")
@click.option("--log-verbose", type=int, default=0, show_default=True, help="tritonserver's --log-verbose level.")
def serve_command(repo, http_port, grpc_port, metrics_port, address, ready_timeout, stop_timeout, max_restarts,
                  restart_window, log_verbose):
    """Serve a model repository (from `export triton`) with Triton Inference Server until Ctrl-C or SIGTERM.

    \b
    Triton does not restart a python model's stub process that dies (killed,
    out of memory, crashed) and keeps reporting ready while every request to
    that model fails. serve checks each model instance's stub every second;
    when one has died it restarts tritonserver (all models load again), at
    most --max-restarts times within --restart-window seconds.

    \b
    Exit status: 0 after Ctrl-C / SIGTERM once tritonserver has exited 0.
    2, with one line on stderr, when tritonserver exits on its own, has to be
    killed or exits non-zero while stopping, a model dies again past
    --max-restarts, or a restarted tritonserver does not become ready.
    """
    if max_restarts < 0:
        raise JetSpecError(f"--max-restarts must be >= 0, got {max_restarts}")
    if not restart_window > 0:
        raise JetSpecError(f"--restart-window must be > 0, got {restart_window:g}")
    server = TritonServer(repo, http_port, grpc_port, metrics_port, address, log_verbose=log_verbose,
                          exit_timeout=stop_timeout)
    supervisor = Supervisor(server, ready_timeout, max_restarts, restart_window)
    # Both set explicitly: a shell starting us in the background leaves SIGINT ignored.
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        supervisor.start()
        supervisor.run()
    except _Terminated:
        _say("stopping tritonserver ...")
        try:
            code = server.stop()
        except _Terminated:  # a second Ctrl-C / SIGTERM: stop waiting
            server.stop(grace=0)
            raise JetSpecError("a second signal while stopping: tritonserver was killed") from None
        _say(f"tritonserver stopped (exit code {code})")
        if server.killed:
            raise JetSpecError(f"tritonserver did not stop within {stop_timeout + 10} s of SIGTERM and was killed")
        if code != 0:
            raise JetSpecError(f"tritonserver exited with code {code} while stopping"
                               + (STOPPED_LATE.format(stop_timeout) if code == 1 else ""))
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
