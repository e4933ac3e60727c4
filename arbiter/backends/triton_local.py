"""A local Triton Inference Server for development, tests, the demo and the
benchmark: the ``tritonserver`` binary that PyPI's ``nvidia-pytriton`` bundles,
run from its own virtualenv (``make triton-env`` builds ``.venv-triton``; it
pins numpy<2, which the main environment cannot).

What it takes to run that binary directly (measured; see the README):
- the Python backend's stub for the venv's Python copied beside
  ``libtriton_python.so`` (PyTriton does this in a temporary workspace);
- ``LD_LIBRARY_PATH`` = the venv interpreter's LIBDIR, else the stub loads
  the system libpython beside another Python's stdlib and models fail to load;
- ``PYTHONPATH`` = the venv's site-packages, where torch and transformers are;
- every endpoint bound to 127.0.0.1 (Triton defaults to 0.0.0.0), explicit
  model control, ``OMP_WAIT_POLICY=PASSIVE`` and bounded torch threads (a
  spinning stub once missed Triton's health check under load).
Readiness is polled over gRPC; stop is SIGTERM (Triton unloads models and
exits in a few seconds), then SIGKILL of the whole process group.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_VENV = ".venv-triton"
_SHM_GLOB = "/dev/shm/triton_python_backend_shm_region_*"

from arbiter.net import free_port


class TritonNotAvailable(RuntimeError):
    pass



def _site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3.*/site-packages"))
    if not found:
        raise TritonNotAvailable(f"{venv} is not a virtualenv (no lib/python3.*/site-packages): run `make triton-env`")
    return found[-1]


def find_tritonserver(venv: str | Path = DEFAULT_VENV) -> Path:
    """The tritonserver binary bundled in ``venv``, with the Python-backend
    stub installed next to the backend (idempotent)."""
    venv = Path(venv)
    home = _site_packages(venv) / "pytriton" / "tritonserver"
    binary = home / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonNotAvailable(f"no tritonserver in {venv} (nvidia-pytriton not installed): run `make triton-env`")
    stub = home / "backends" / "python" / "triton_python_backend_stub"
    if not stub.is_file():
        version = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        source = home / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not source.is_file():
            raise TritonNotAvailable(f"nvidia-pytriton ships no Python-backend stub for Python {version}")
        shutil.copy2(source, stub)
    return binary


class LocalTriton:
    def __init__(
        self,
        repository: str | Path,
        *,
        venv: str | Path = DEFAULT_VENV,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        load_models: tuple[str, ...] = (),
        torch_threads: int = 1,
        log_path: str | Path | None = None,
    ):
        self.repository = Path(repository).resolve()
        self.venv = Path(venv).resolve()
        self.binary = find_tritonserver(self.venv)
        # Fixed across restarts: clients keep their target.
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.load_models = load_models
        self.torch_threads = torch_threads
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self._shm_before: set[str] = set()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self) -> list[str]:
        home = self.binary.parent.parent
        return [
            str(self.binary),
            f"--model-repository={self.repository}",
            "--model-control-mode=explicit",
            *(f"--load-model={name}" for name in self.load_models),
            f"--backend-directory={home / 'backends'}",
            f"--cache-directory={home / 'caches'}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
            "--http-address=127.0.0.1", f"--http-port={self.http_port}",
            "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--exit-timeout-secs=20",
            "--log-verbose=0",
        ]

    def environment(self) -> dict[str, str]:
        libdir = subprocess.run(
            [str(self.venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        env = dict(os.environ)
        env.update(
            LD_LIBRARY_PATH=":".join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p),
            PYTHONPATH=str(_site_packages(self.venv)),
            PATH=f"{self.venv / 'bin'}:{os.environ.get('PATH', '')}",
            OMP_WAIT_POLICY="PASSIVE",
            OMP_NUM_THREADS=str(self.torch_threads),
            MKL_NUM_THREADS=str(self.torch_threads),
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
        )
        env.pop("PYTHONHOME", None)
        return env

    def start(self, timeout_s: float = 300.0) -> LocalTriton:
        """Start and wait until Triton and the ``load_models`` are ready."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self._shm_before = set(glob.glob(_SHM_GLOB))
        log = self.log_path.open("ab")
        try:
            # Own session: Ctrl-C in a terminal or pytest's signals do not reach
            # it, and stop() can signal the stubs with it.
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.environment(), start_new_session=True
            )
        finally:
            log.close()
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout_s
        delay = 0.1
        with grpcclient.InferenceServerClient(self.url) as client:
            while True:
                if self.proc.poll() is not None:
                    raise TritonNotAvailable(
                        f"tritonserver exited with {self.proc.returncode} before it was ready:\n{self.log_tail()}"
                    )
                try:
                    if client.is_server_ready(client_timeout=2) and all(
                        client.is_model_ready(name, client_timeout=2) for name in self.load_models
                    ):
                        return
                except Exception:  # not listening yet
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise TritonNotAvailable(f"tritonserver not ready after {timeout_s:.0f}s:\n{self.log_tail()}")
                time.sleep(delay)
                delay = min(delay * 1.5, 1.0)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 40.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        # Stubs of a killed server outlive it in the same process group.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _remove_stale_shm(keep=self._shm_before)

    def restart(self, timeout_s: float = 300.0) -> None:
        self.stop()
        self.start(timeout_s)

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _remove_stale_shm(keep: set[str]) -> None:
    """Shared-memory regions this server made whose stub is gone (a killed
    server leaves them in /dev/shm); those still mapped by a live process, or
    there before it started, are left alone."""
    mapped: set[str] = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as fh:
                mapped.update(line.split()[-1] for line in fh if "triton_python_backend_shm" in line)
        except OSError:
            continue
    for path in glob.glob(_SHM_GLOB):
        if path not in mapped and path not in keep:
            try:
                os.unlink(path)
            except OSError:
                pass


def main(argv: list[str] | None = None) -> int:
    """``arbiter triton serve``: run a local Triton on a repository until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="arbiter triton serve")
    add_serve_arguments(parser)
    return serve(parser.parse_args(argv))


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", required=True, help="the model repository (arbiter triton export --out)")
    parser.add_argument("--venv", default=DEFAULT_VENV, help="virtualenv with nvidia-pytriton (make triton-env)")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--load-model", action="append", default=[], help="load at start (repeatable)")
    parser.add_argument("--torch-threads", type=int, default=1, help="per model instance")


def serve(args: argparse.Namespace) -> int:
    try:
        triton = LocalTriton(
            args.repository, venv=args.venv, grpc_port=args.grpc_port, http_port=args.http_port,
            metrics_port=args.metrics_port, load_models=tuple(args.load_model), torch_threads=args.torch_threads,
        )
        triton.start()
    except TritonNotAvailable as err:
        print(f"arbiter triton serve: {err}", file=sys.stderr)
        return 1
    print(f"triton: gRPC on {triton.url}, log {triton.log_path}", flush=True)
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    try:
        while not stop and triton.proc is not None and triton.proc.poll() is None:
            time.sleep(0.5)
    finally:
        triton.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
