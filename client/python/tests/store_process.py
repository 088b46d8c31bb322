"""The real `sllm-store` binary for the Python suites (client/python/tests
and the real-vLLM tier): SLLM_STORE_BIN, else target/debug; a daemon on
loopback that says where it listens."""

import os
import re
import subprocess
import threading

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def binary() -> str:
    path = os.environ.get("SLLM_STORE_BIN") or os.path.join(ROOT, "target", "debug", "sllm-store")
    if not os.path.exists(path):
        pytest.fail(f"{path} not found: build it with `cargo build -p sllm-store` or set SLLM_STORE_BIN")
    return path


class Daemon:
    """`sllm-store start` on a free loopback port (host backend unless
    `device` says otherwise); `extra` flags are appended."""

    def __init__(self, storage, *extra, device="host", pool="64MiB", chunk="256KiB"):
        self.proc = subprocess.Popen(
            [binary(), "start", "--port", "0", "--storage-path", str(storage), "--device", device,
             "--mem-pool-size", pool, "--chunk-size", chunk, *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"},
        )
        self.lines = []
        ready = threading.Event()

        def pump():
            for line in self.proc.stderr:
                self.lines.append(line)
                m = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
                if m:
                    self.addr = m.group(1)
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(30):
            self.proc.kill()
            pytest.fail("the daemon did not get ready: " + "".join(self.lines))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
