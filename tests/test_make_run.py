"""`make run`'s launcher: demo mode serves the example models offline, it
starts beside other Envoys (another launcher, an Envoy holding the default
hot-restart base id), a taken port or an Envoy that does not start or dies
ends it with a message and a non-zero status, and stopping it (or killing
it) stops Envoy and the demo provider, by PID."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import anthropic
import openai
import pytest
from google import genai
from google.genai import types

from conftest import ARTIFACT, BUILD, CREDENTIAL_VARS, ROOT, envoy_binary, free_port, http, wait_for

BANNER_END = "Stop with Ctrl-C"
HELLO = "Hello from the demo provider! You said: hello"


def alive(pid):
    """Whether `pid` runs (a zombie waiting for its parent does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def command_line(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


class Launcher:
    """envoy/tools/run.py as `make run` starts it, its output collected."""

    def __init__(self, port, admin_port=None, wasm=ARTIFACT, env=None):
        """`wasm`: the built gateway of this run's build (MESHLLM_BUILD)."""
        args = [sys.executable, str(ROOT / "envoy" / "tools" / "run.py"), "--port", str(port),
                "--build", BUILD, "--module" if BUILD == "native" else "--wasm", str(wasm)]
        if admin_port is not None:
            args += ["--admin-port", str(admin_port)]
        clean = {k: v for k, v in os.environ.items()
                 if not CREDENTIAL_VARS.search(k) and k not in ("PORT", "ADMIN_PORT")}
        clean.update(env or {})
        self.port = port
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=clean, text=True, start_new_session=True)
        self.lines = []
        self.banner_seen = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if BANNER_END in line:
                self.banner_seen.set()
        self.banner_seen.set()  # exited: nothing more will come

    def output(self):
        return "".join(self.lines)

    def wait_banner(self, timeout=90):
        self.banner_seen.wait(timeout)
        out = self.output()
        assert BANNER_END in out, out[-4000:]
        assert f"listening on http://127.0.0.1:{self.port}" in out, out[-4000:]
        self.admin_port = int(re.search(r"Envoy admin: http://127\.0\.0\.1:(\d+)", out).group(1))
        return self

    def children(self):
        """{"envoy": pid, "demo": pid} for the processes the launcher started."""
        found = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                               text=True).stdout.split()
        kids = {}
        for pid in map(int, found):
            cmd = command_line(pid)
            kids["demo" if "mock_provider.py" in cmd else "envoy" if "envoy" in cmd else cmd] = pid
        return kids

    def wait_exit(self, timeout=30):
        return self.proc.wait(timeout=timeout)

    def stop(self):
        """SIGTERM, as a supervisor (or Ctrl-C) stops it; returns its status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session, started here
            self.proc.wait()
            raise


def chat(port, text="hello", model="gpt-4o-mini"):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                           max_retries=0, timeout=15)
    resp = client.chat.completions.create(model=model,
                                          messages=[{"role": "user", "content": text}])
    return resp.choices[0].message.content


def assert_closed(*ports):
    for p in ports:
        with pytest.raises(OSError):
            http("GET", f"http://127.0.0.1:{p}/", timeout=1)


def test_run_serves_the_demo_and_stops_cleanly(wasm):
    port, admin = free_port(), free_port()
    run = Launcher(port, admin)
    try:
        run.wait_banner()
        assert run.admin_port == admin
        assert "demo provider:  openai" in run.output()
        kids = run.children()
        assert set(kids) == {"envoy", "demo"}, kids

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                               max_retries=0, timeout=15)
        assert "gpt-4o-mini" in [m.id for m in client.models.list()]
        assert chat(port) == HELLO
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="llama-3.3-70b", stream=True,
                messages=[{"role": "user", "content": "stream"}])
            if c.choices)
        assert text.endswith("You said: stream")

        # The README's other SDKs, on every demo provider kind.
        claude = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="unused",
                                     max_retries=0, timeout=15)
        gemini = genai.Client(api_key="unused", http_options=types.HttpOptions(
            base_url=f"http://127.0.0.1:{port}", api_version="v1beta", timeout=15000))
        for model in ("gemini-flash", "vertex-claude", "bedrock-nova", "claude"):
            m = claude.messages.create(model=model, max_tokens=50,
                                       messages=[{"role": "user", "content": "hello"}])
            assert m.content[0].text == HELLO, model
            r = gemini.models.generate_content(model=model, contents="hello")
            assert r.text == HELLO, model
    finally:
        status = run.stop()
    assert status == 0, run.output()[-3000:]
    # Envoy and the demo provider went with it, by PID; their ports are closed.
    for name, pid in kids.items():
        assert not alive(pid), f"{name} ({pid}) left running"
    assert_closed(port, admin)
    leftover = subprocess.run(["pgrep", "-s", str(run.proc.pid)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "processes left behind"


def test_two_launchers_at_once_both_serve(wasm):
    """The second `make run` (on another PORT) starts beside the first: no
    base id to share, and ADMIN_PORT unset takes 9901 or any free port."""
    first = Launcher(free_port())
    second = None
    try:
        first.wait_banner()
        second = Launcher(free_port())
        second.wait_banner()
        assert first.admin_port != second.admin_port
        if first.admin_port == 9901:
            assert "(9901 was in use)" in second.output()
        for run in (first, second):
            status, _, body = http("GET", f"http://127.0.0.1:{run.admin_port}/ready")
            assert (status, body.strip()) == (200, b"LIVE")
            assert chat(run.port) == HELLO
        assert first.proc.poll() is None and second.proc.poll() is None
    finally:
        statuses = [run.stop() for run in (first, second) if run]
    assert statuses == [0, 0], first.output()[-2000:] + (second.output()[-2000:] if second else "")


def test_launcher_starts_beside_an_envoy_holding_base_id_0(wasm, tmp_path):
    """An Envoy on the default hot-restart base id 0 (what the launcher used
    to take too) does not stop the launcher. If another Envoy on this machine
    already holds base id 0, the test's own cannot start, and that other
    Envoy is the neighbour instead; the test never touches it."""
    shm = "/dev/shm/envoy_shared_memory_0"
    shm_before = os.path.exists(shm)
    admin = free_port()
    bootstrap = tmp_path / "neighbour.json"
    bootstrap.write_text(json.dumps(
        {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}}}))
    log_path = tmp_path / "neighbour.log"
    with open(log_path, "w") as log:
        neighbour = subprocess.Popen(
            [envoy_binary(), "-c", str(bootstrap), "--base-id", "0", "-l", "info"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    run = None
    try:
        def settled():
            if neighbour.poll() is not None:
                return True
            try:
                return http("GET", f"http://127.0.0.1:{admin}/ready", timeout=1)[0] == 200
            except OSError:
                return False
        assert wait_for(settled, timeout=60), log_path.read_text()[-3000:]
        if neighbour.poll() is not None:
            # Base id 0 is taken by an Envoy this test did not start.
            assert "unable to bind domain socket with base_id=0" in log_path.read_text(), \
                log_path.read_text()[-3000:]
        run = Launcher(free_port())
        run.wait_banner()
        assert chat(run.port) == HELLO
        if neighbour.poll() is None:
            assert http("GET", f"http://127.0.0.1:{admin}/ready")[0] == 200
    finally:
        status = run.stop() if run else None
        held_base_id = neighbour.poll() is None
        if held_base_id:
            neighbour.send_signal(signal.SIGTERM)
            try:
                neighbour.wait(timeout=20)
            except subprocess.TimeoutExpired:
                neighbour.kill()
                neighbour.wait()
            # Envoy leaves its hot-restart shared memory behind: remove it
            # when this test's Envoy made it (it held base id 0 throughout).
            if not shm_before and os.path.exists(shm):
                os.unlink(shm)
    assert status == 0, run.output()[-3000:]


def test_taken_port_fails_with_a_message(wasm):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        run = Launcher(port)
        assert run.wait_exit() == 1
        out = run.output()
        assert f"cannot listen on 127.0.0.1:{port}" in out, out
        assert f"make run PORT={port + 1}" in out, out

        # An admin port asked for explicitly is used as given or not at all.
        run = Launcher(free_port(), admin_port=port)
        assert run.wait_exit() == 1
        out = run.output()
        assert f"cannot use 127.0.0.1:{port} for Envoy's admin interface" in out, out
        assert "ADMIN_PORT" in out


def test_envoy_that_does_not_start_fails_the_launcher_with_its_log(wasm, tmp_path):
    missing = tmp_path / ("missing.so" if BUILD == "native" else "missing.wasm")
    run = Launcher(free_port(), wasm=missing)
    assert run.wait_exit(timeout=90) == 1
    out = run.output()
    assert "meshllm: Envoy did not start: it exited with code 1" in out, out
    # The end of Envoy's own log says why.
    why = {"wasm": f"Invalid path: {missing}",
           "native": f"Unable to load dynamic module {missing}"}[BUILD]
    assert why in out, out


def test_envoy_dying_later_fails_the_launcher_and_stops_the_demo(wasm):
    run = Launcher(free_port())
    try:
        run.wait_banner()
        kids = run.children()
        os.kill(kids["envoy"], signal.SIGKILL)
        assert run.wait_exit() == 1
    finally:
        run.stop()
    assert "meshllm: Envoy stopped on its own (exit code -9)" in run.output()
    assert not alive(kids["demo"])


def test_killed_launcher_leaves_nothing_running(wasm):
    """Even SIGKILL, which the launcher cannot catch: the kernel sends its
    children SIGTERM (parent-death signal)."""
    run = Launcher(free_port())
    kids = {}
    try:
        run.wait_banner()
        kids = run.children()
        assert set(kids) == {"envoy", "demo"}, kids
        run.proc.kill()
        run.proc.wait(timeout=10)
        assert wait_for(lambda: not any(alive(p) for p in kids.values()), timeout=30), \
            {n: alive(p) for n, p in kids.items()}
    finally:
        run.stop()
        for pid in kids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert_closed(run.port, run.admin_port)
