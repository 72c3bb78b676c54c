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
"""

from __future__ import annotations

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


class TritonServer:
    """One tritonserver child process over `repo`: start(), wait_ready(), stop(); also a context manager."""

    def __init__(self, repo: Path | str, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 address: str = "0.0.0.0", log: IO | None = None, log_verbose: int = 0):
        self.repo = Path(repo)
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.address = address
        self.log = log  # None: the child writes to our stdout/stderr
        self.log_verbose = log_verbose
        self.process: subprocess.Popen | None = None
        self.workdir: Path | None = None
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

    def command(self, dist: TritonDistribution, backends: Path) -> list[str]:
        return [
            str(dist.binary), f"--model-repository={self.repo.resolve()}", f"--backend-directory={backends}",
            f"--http-address={self.address}", f"--http-port={self.http_port}",
            f"--grpc-address={self.address}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.address}", f"--metrics-port={self.metrics_port}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--exit-on-error=true", "--strict-readiness=true", f"--log-verbose={self.log_verbose}",
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

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM the server, wait up to `grace` s, then SIGKILL its whole process group. Returns its exit code."""
        process, code = self.process, None
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
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


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated()


@click.command("serve")
@click.argument("repo", type=click.Path(path_type=Path))
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--metrics-port", type=int, default=8002, show_default=True)
@click.option("--address", default="0.0.0.0", show_default=True, help="Address all three endpoints bind to.")
@click.option("--ready-timeout", type=float, default=600.0, show_default=True,
              help="Seconds to wait for the models to load.")
@click.option("--log-verbose", type=int, default=0, show_default=True, help="tritonserver's --log-verbose level.")
def serve_command(repo, http_port, grpc_port, metrics_port, address, ready_timeout, log_verbose):
    """Serve a model repository (from `export triton`) with Triton Inference Server until Ctrl-C or SIGTERM."""
    server = TritonServer(repo, http_port, grpc_port, metrics_port, address, log_verbose=log_verbose)
    # Both set explicitly: a shell starting us in the background leaves SIGINT ignored.
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        server.wait_ready(ready_timeout)
        urls = server.endpoints
        click.echo(f"serving {repo}: HTTP {urls['http']}  gRPC {urls['grpc']}  metrics {urls['metrics']}  "
                   "(Ctrl-C to stop)", err=True)
        code = server.process.wait()
        raise JetSpecError(f"tritonserver exited on its own with code {code}")
    except _Terminated:
        click.echo("stopping tritonserver ...", err=True)
        code = server.stop()
        click.echo(f"tritonserver stopped (exit code {code})", err=True)
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
