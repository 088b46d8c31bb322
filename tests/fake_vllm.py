#!/usr/bin/env python3
"""A stand-in for vLLM's OpenAI-compatible server, for the tests of
`sllm-bench restart` (bench/tests/restart.rs). Standard library only.

    python3 tests/fake_vllm.py --port P --mode ready|crash|hang
        [--delay S] [--model-id ID] [--completion TEXT] [--api-key KEY]
        [--pid-file F] [--spawn-child] [--ignore-term]

- ready: listens at once but answers 404 until --delay seconds have passed,
  then 200 on GET /v1/models (one model, --model-id, "fake/model" by
  default, as vLLM lists its --served-model-name or the path it serves) and
  on POST /v1/completions for that model (a minimal completion whose text
  is --completion, " fake" by default);
- crash: sleeps --delay, logs a few lines (the last an error) to stderr and
  exits with status 3 before serving anything;
- hang: listens and accepts connections but never answers.

--api-key KEY makes every request without `Authorization: Bearer KEY` get
HTTP 401, as vLLM's --api-key does. --pid-file appends this process's pid to F; --spawn-child starts a
grandchild `sleep 600` and appends its pid to F.child, so that tests can
check that the whole process group was stopped; --ignore-term ignores
SIGTERM, so that only SIGKILL stops it.
"""

import argparse
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import time

DEFAULT_MODEL_ID = "fake/model"
DEFAULT_COMPLETION = " fake"


def log(message):
    print(f"fake_vllm: {message}", file=sys.stderr, flush=True)


def append_line(path, value):
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{value}\n")


def serve_ready(port, delay, model_id, completion, api_key):
    started = time.monotonic()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def ready(self):
            return time.monotonic() - started >= delay

        def reply(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def authorized(self):
            if api_key is None or self.headers.get("Authorization") == f"Bearer {api_key}":
                return True
            self.reply(401, {"error": "Unauthorized"})
            return False

        def do_GET(self):
            if not self.authorized():
                return
            if self.path == "/v1/models" and self.ready():
                self.reply(200, {
                    "object": "list",
                    "data": [{"id": model_id, "object": "model"}],
                })
            else:
                self.reply(404, {"detail": "Not Found"})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            try:
                request = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                self.reply(400, {"error": "request body is not JSON"})
                return
            if not self.authorized():
                return
            if self.path != "/v1/completions" or not self.ready():
                self.reply(404, {"detail": "Not Found"})
            elif request.get("model") != model_id:
                self.reply(404, {"error": f"model {request.get('model')!r} not served"})
            else:
                self.reply(200, {
                    "id": "cmpl-fake",
                    "object": "text_completion",
                    "model": model_id,
                    "choices": [{"text": completion, "index": 0, "finish_reason": "length"}],
                })

        def log_message(self, format, *args):
            log(format % args)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    log(f"listening on 127.0.0.1:{port}, ready after {delay} s")
    server.serve_forever()


def serve_hang(port):
    listener = socket.create_server(("127.0.0.1", port))
    log(f"listening on 127.0.0.1:{port}, never answering")
    held = []
    while True:
        conn, _ = listener.accept()
        held.append(conn)


def crash(delay):
    time.sleep(delay)
    log("loading weights")
    log("initialising the engine")
    log("ERROR: fake engine failed: CUDA out of memory (simulated)")
    sys.exit(3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=["ready", "crash", "hang"], required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--model-id", default=DEFAULT_MODEL_ID)
    parser.add_argument("--completion", default=DEFAULT_COMPLETION)
    parser.add_argument("--api-key")
    parser.add_argument("--pid-file")
    parser.add_argument("--spawn-child", action="store_true")
    parser.add_argument("--ignore-term", action="store_true")
    args = parser.parse_args()

    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.pid_file:
        append_line(args.pid_file, os.getpid())
    if args.spawn_child:
        child = subprocess.Popen(["sleep", "600"])
        if args.pid_file:
            append_line(args.pid_file + ".child", child.pid)
    log(f"starting in mode {args.mode}")

    if args.mode == "crash":
        crash(args.delay)
    elif args.mode == "hang":
        serve_hang(args.port)
    else:
        serve_ready(args.port, args.delay, args.model_id, args.completion, args.api_key)


if __name__ == "__main__":
    main()
