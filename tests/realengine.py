#!/usr/bin/env python3
"""The real llama.cpp engine the tests run against: llama-cpp-python from PyPI, built once.

    python3 tests/realengine.py            # says whether it is built, and where
    python3 tests/realengine.py --build    # builds it unless built (~4 min on 2 cores)
    python3 tests/realengine.py --serve    # serves the tiny model on a free loopback port

The build is a virtualenv under ~/.cache/koubou-tests/engine/, outside the checkout. It is
keyed by the pinned versions below, the Python and the CPU (llama.cpp is compiled for this CPU),
so it is rebuilt only when one of them changes. Each server gets a model written fresh by
tiny_model.py in that virtualenv: a 1.4 MB random-weight Llama with a real tokenizer. Nothing is
downloaded but the PyPI packages, and the server binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

VERSION = "0.3.36"
# The versions this engine was tried with. The server's web stack is pinned too: a newer
# FastAPI or Starlette under llama_cpp.server is a change of engine, so it means a rebuild.
PINS = (
    f"llama-cpp-python[server]=={VERSION}",
    "gguf==0.19.0",
    "sentencepiece==0.2.3",
    "numpy==2.4.6",
    "fastapi==0.165.0",
    "starlette==1.10.0",
    "uvicorn==0.54.0",
    "sse-starlette==3.7.0",
    "starlette-context==0.3.6",
    "pydantic==2.14.3",
    "pydantic-settings==2.16.3",
)
# LLAVA off: the multimodal library is not needed for text chat and costs build time.
CMAKE_ARGS = "-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON"
# llama-cpp-python forces llama.cpp's `common` library on (with cpp-httplib), although its Python
# package loads only libllama and libggml: that is half of the compile time. This file, run by
# CMake right after llama.cpp's project(), sets it off as a normal variable, which shadows the
# forced cache entry inside llama.cpp's directory.
SKIP_COMMON = "set(LLAMA_BUILD_COMMON OFF)\n"
MODEL_ID = "tiny-chatml"
N_CTX = 512
TINY_MODEL = Path(__file__).resolve().parent / "tiny_model.py"
BUILD_ENABLES = "python3 tests/realengine.py --build"


class EngineError(RuntimeError):
    """A build or a server start that failed; the message ends with the tail of its log."""

    def __init__(self, what: str, log: Path) -> None:
        tail = log.read_text(errors="replace").splitlines()[-30:] if log.exists() else []
        super().__init__("\n".join([f"{what}; log {log}:", *tail]))


def cache_dir() -> Path:
    """Where every build lives: $XDG_CACHE_HOME/koubou-tests/engine, else ~/.cache/..."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "koubou-tests" / "engine"


def build_dir() -> Path:
    """This version's build for this Python."""
    return cache_dir() / f"llama-cpp-python-{VERSION}-py{sys.version_info[0]}.{sys.version_info[1]}"


def python() -> Path:
    """The engine's interpreter."""
    return build_dir() / "venv" / "bin" / "python"


def cpu_flags() -> str:
    """A digest of the CPU's feature flags: a build for another CPU may not run on this one."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    flags = next((line for line in lines if line.startswith("flags")), "")
    return hashlib.sha256(flags.encode()).hexdigest()[:16]


def recipe() -> str:
    """Everything a build depends on; a build whose recorded recipe differs is rebuilt."""
    return "\n".join([*PINS, f"CMAKE_ARGS={CMAKE_ARGS}", f"project include: {SKIP_COMMON}",
                      f"python={sys.version.split()[0]}", f"cpu={cpu_flags()}"])


def is_built() -> bool:
    """Whether a finished build for this recipe is in the cache."""
    marker = build_dir() / "built"
    return python().exists() and marker.exists() and marker.read_text() == recipe()


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for the engine's processes: none of the caller's Python paths."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(extra)
    return env


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    """One build at a time per cache, across processes."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def run_logged(command: list[str], log: Path, what: str, **env: str) -> None:
    """Run a build step with its output appended to the log; EngineError if it fails."""
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(command)}\n".encode())
        out.flush()
        done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT, env=clean_env(**env))
    if done.returncode != 0:
        raise EngineError(f"{what} failed (exit {done.returncode})", log)


def build(force: bool = False) -> bool:
    """Build the engine unless this recipe is built; True when it built."""
    with build_lock():
        if is_built() and not force:
            return False
        target = build_dir()
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        log = target / "build.log"
        run_logged([sys.executable, "-m", "venv", str(target / "venv")], log, "python3 -m venv")
        skip_common = target / "skip-common.cmake"
        skip_common.write_text(SKIP_COMMON)
        cmake_args = f"{CMAKE_ARGS} -DCMAKE_PROJECT_llama.cpp_INCLUDE={skip_common}"
        # --no-cache-dir: pip's wheel cache would hand a build for another CPU to a rebuild.
        run_logged([str(python()), "-m", "pip", "install", "--no-cache-dir", "-v", *PINS], log,
                   f"pip install llama-cpp-python {VERSION}", CMAKE_ARGS=cmake_args,
                   CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1),
                   PIP_DISABLE_PIP_VERSION_CHECK="1")
        run_logged([str(python()), "-c", "import gguf, sentencepiece, llama_cpp.server.app"], log,
                   "importing the built engine")
        (target / "built").write_text(recipe())
        return True


def write_model(path: Path) -> Path:
    """The tiny model, written by tiny_model.py in the engine's interpreter."""
    log = path.with_suffix(".log")
    run_logged([str(python()), str(TINY_MODEL), "--out", str(path)], log, "writing the model")
    return path


def free_port() -> int:
    """A port nobody listens on at this moment, on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answers(base_url: str) -> bool:
    """Whether /v1/models answers; proxies ignored, the server is on loopback."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{base_url}/models", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class Server:
    """llama_cpp.server on a free loopback port, stopped by its pid."""

    def __init__(self, model: Path, log: Path) -> None:
        self.model = model
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.base_url = ""

    def command(self, port: int) -> list[str]:
        # One thread: on 2 cores llama.cpp's spinning OpenMP threads made it ~2.5x slower and
        # took the core the spool under test needs. interrupt_requests off: by default a new
        # request cuts off a running stream instead of queueing behind it.
        return [str(python()), "-m", "llama_cpp.server", "--model", str(self.model),
                "--model_alias", MODEL_ID, "--host", "127.0.0.1", "--port", str(port),
                "--chat_format", "chatml", "--n_ctx", str(N_CTX), "--n_threads", "1",
                "--n_threads_batch", "1", "--interrupt_requests", "False"]

    def start(self, timeout: float = 120) -> str:
        """Start it and wait until /v1/models answers; its base_url."""
        for _ in range(3):  # the free port may be taken before the server binds it
            if self.try_start(free_port(), timeout):
                return self.base_url
            if "address already in use" not in self.log.read_text(errors="replace"):
                break
        raise EngineError("the llama.cpp server did not start", self.log)

    def try_start(self, port: int, timeout: float) -> bool:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.command(port), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, env=clean_env())
        self.base_url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            if answers(self.base_url):
                return True
            time.sleep(0.2)  # nothing to wait on but the socket itself
        self.stop()
        return False

    def stop(self, grace: float = 10) -> None:
        """TERM by pid, then KILL after the grace period; reaped either way."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=grace)
        self.proc = None


@contextlib.contextmanager
def serving(workdir: Path) -> Iterator[str]:
    """A fresh model served from workdir for the duration; yields the base_url."""
    server = Server(write_model(workdir / "tiny-chatml.gguf"), workdir / "server.log")
    try:
        yield server.start()
    finally:
        server.stop()


def build_now(force: bool) -> bool:
    """Build with one line saying so first, and one with the time after; False if it failed."""
    print(f"building the real llama.cpp engine (llama-cpp-python {VERSION}) into "
          f"{build_dir()}: about 4 minutes on 2 cores", flush=True)
    began = time.monotonic()
    try:
        build(force=force)
    except EngineError as error:
        print(error, file=sys.stderr)
        return False
    print(f"built in {time.monotonic() - began:.0f} s", flush=True)
    return True


def serve() -> None:
    """Serve a fresh tiny model until SIGINT (Ctrl-C) or SIGTERM, then stop it."""
    stop = {signal.SIGINT, signal.SIGTERM}
    with tempfile.TemporaryDirectory(prefix="koubou-engine-") as workdir:
        with serving(Path(workdir)) as base_url:
            # Blocked only now: the server inherits the signal mask, and must feel SIGTERM.
            signal.pthread_sigmask(signal.SIG_BLOCK, stop)
            print(f"serving model {MODEL_ID!r} at {base_url}; Ctrl-C stops it", flush=True)
            signal.sigwait(stop)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="build it unless built (quiet then)")
    parser.add_argument("--force", action="store_true", help="with --build: build it again")
    parser.add_argument("--serve", action="store_true", help="serve the tiny model until Ctrl-C")
    args = parser.parse_args()
    if args.build and (args.force or not is_built()) and not build_now(args.force):
        return 1
    if not is_built():
        print(f"not built: {BUILD_ENABLES} builds it into {build_dir()}")
        return 1
    if args.serve:
        serve()
    elif not args.build:
        print(f"built: {build_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
