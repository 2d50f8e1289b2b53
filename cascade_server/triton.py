"""The bundled tritonserver (from the PyPI package nvidia-pytriton), for local runs and tests.

- `python_backend_repository` derives, from the production model repository (ONNX Runtime
  platform, GPU instances), an equivalent one for the bundled build: the Python backend running
  the same `model.onnx` with onnxruntime on CPU.
- `TritonServer` starts the binary on free ports, waits until it is ready, and always stops it
  (SIGTERM, then SIGKILL after a bound).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def read_model_config(path: Path) -> Any:
    """config.pbtxt -> Triton ModelConfig protobuf (tritonclient ships the schema)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def write_model_config(config: Any, path: Path) -> None:
    from google.protobuf import text_format

    path.write_text(text_format.MessageToString(config))


def python_backend_repository(
    source: Path, target: Path, *, intra_op_threads: int = 1, delay_ms: int = 0
) -> Path:
    """Derive a Python-backend repository serving the same ONNX files as `source`."""
    from tritonclient.grpc import model_config_pb2

    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    model_py = resources.files("cascade_server") / "triton_python_model" / "model.py"
    found = 0
    for config_path in sorted(source.glob("*/config.pbtxt")):
        model_dir = config_path.parent
        config = read_model_config(config_path)
        name = config.name or model_dir.name
        versions = sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
        if not versions:
            log.warning("model %s has no version directory; skipped", name)
            continue
        config.name = name
        config.platform = ""
        config.backend = "python"
        config.default_model_filename = ""
        for group in config.instance_group:
            group.kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
            del group.gpus[:]
        config.parameters["onnx_file"].string_value = "model.onnx"
        config.parameters["intra_op_threads"].string_value = str(intra_op_threads)
        if delay_ms:  # fault injection: a slow teacher (reliability tests)
            config.parameters["delay_ms"].string_value = str(delay_ms)
        out_dir = target / name
        out_dir.mkdir()
        write_model_config(config, out_dir / "config.pbtxt")
        for version in versions:
            onnx = version / "model.onnx"
            if not onnx.is_file():
                raise FileNotFoundError(f"{onnx} is missing (run `cascade-train` export first)")
            (out_dir / version.name).mkdir()
            (out_dir / version.name / "model.onnx").symlink_to(onnx.resolve())
            (out_dir / version.name / "model.py").write_text(model_py.read_text())
        found += 1
    if not found:
        raise FileNotFoundError(f"no model with a version directory under {source}")
    return target


def _pytriton_dir() -> Path:
    try:
        import pytriton
    except ImportError:
        raise RuntimeError(
            "the bundled tritonserver needs `pip install cascade-server[triton]` (nvidia-pytriton)"
        ) from None
    return Path(pytriton.__file__).parent / "tritonserver"


def prepare_backends(workdir: Path) -> Path:
    """A backend directory with the Python backend and the stub for this interpreter."""
    root = _pytriton_dir()
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    if not stub.is_file():
        raise RuntimeError(f"nvidia-pytriton has no Python backend stub for Python {pyver}")
    backends = workdir / "backends"
    python = backends / "python"
    if not (python / "triton_python_backend_stub").is_file():
        if python.exists():
            shutil.rmtree(python)
        shutil.copytree(root / "backends" / "python", python)
        shutil.copy2(stub, python / "triton_python_backend_stub")
    return backends


def _die_with_parent() -> None:
    """In the child before exec: Linux sends it SIGTERM if its parent dies (even by SIGKILL),
    so a crashed gateway never leaves a tritonserver running."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TritonPorts:
    http: int
    grpc: int
    metrics: int

    @classmethod
    def free(cls) -> TritonPorts:
        return cls(free_port(), free_port(), free_port())


class TritonServer:
    """A tritonserver process. Use as a context manager, or call start() and stop()."""

    def __init__(
        self,
        repository: Path,
        workdir: Path,
        ports: TritonPorts | None = None,
        *,
        host: str = "127.0.0.1",
    ) -> None:
        self.repository = repository
        self.workdir = workdir
        self.ports = ports or TritonPorts.free()
        self.host = host
        self.log_path = workdir / "tritonserver.log"
        self.process: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.ports.http}"

    def command(self) -> list[str]:
        binary = _pytriton_dir() / "bin" / "tritonserver"
        return [
            str(binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={prepare_backends(self.workdir)}",
            f"--http-address={self.host}",
            f"--http-port={self.ports.http}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports.metrics}",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--log-verbose=0",
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = _pytriton_dir().parent.parent / "nvidia_pytriton.libs"
        # The copied stub loses its RPATH; the bundled libraries are found through this.
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p
        )
        # The stub finds numpy and onnxruntime through the first python on PATH: ours.
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        return env

    def start(self, timeout_s: float = 60.0) -> TritonServer:
        """Starts and waits until ready. Call it from a thread that outlives the server: the
        parent-death signal follows the thread that started it, not the process."""
        if self.process is not None:
            raise RuntimeError("tritonserver already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        log.info("starting tritonserver: grpc %s, http %s", self.grpc_url, self.http_url)
        with open(self.log_path, "ab") as logfile:
            # Own session: a Ctrl-C to the gateway's terminal must not kill Triton before the
            # gateway has drained; we stop it ourselves.
            self.process = subprocess.Popen(
                cmd,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"tritonserver exited with {self.process.returncode}; log:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.1)
        raise TimeoutError(f"tritonserver not ready after {timeout_s}s; log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, wait (Triton takes seconds to exit and holds its ports until then), kill."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("tritonserver did not exit in %ss; killing it", timeout_s)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def kill(self) -> None:
        """Abrupt death (SIGKILL to the whole process group), as in a crash."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
