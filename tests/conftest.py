"""Fixtures: mock providers on loopback and a real Envoy running the built
gateway, on free ports, started and stopped by PID.

MESHLLM_BUILD picks the build every `Envoy(...)` loads: `wasm` (default,
meshllm.wasm) or `native` (the dynamic module libmeshllm.so); the tests'
assertions are the same for both. Tests that load the gateway into Envoy
take the `wasm` fixture (the built artifact of the selected build, whatever
its name) and are marked `envoy`: `make test` runs those once more with
MESHLLM_BUILD=native. Tests marked `wasm_only("why")` are skipped there."""

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "envoy" / "tools"))

import render  # noqa: E402
from mock_provider import MockProvider  # noqa: E402
from run import envoy_binary, free_port  # noqa: E402,F401  (shared with `make run`)

WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "meshllm.wasm"
NATIVE = ROOT / render.NATIVE_DEFAULT

BUILD = os.environ.get("MESHLLM_BUILD", "wasm")
if BUILD not in render.BUILDS:
    raise pytest.UsageError(f"MESHLLM_BUILD={BUILD!r}: one of {', '.join(render.BUILDS)}")
# What Envoy loads in this run, and how it is built.
ARTIFACT = NATIVE if BUILD == "native" else WASM
BUILD_COMMAND = "make build"
# Envoy's loggers for either build's own log lines.
LOG_COMPONENTS = "wasm:info,dynamic_modules:info"
EXAMPLE_CONFIG = ROOT / "envoy" / "meshllm.json"

# Fake provider keys the gateway's Envoy gets in its environment.
KEYS = {
    "OPENAI_API_KEY": "sk-test-openai-123",
    "AZURE_OPENAI_API_KEY": "az-test-456",
    "GROQ_API_KEY": "gsk-test-789",
    "ANTHROPIC_API_KEY": "sk-ant-test-012",
    "GEMINI_API_KEY": "AIza-test-345",
    "VERTEX_ACCESS_TOKEN": "ya29.test-678",
    "AWS_ACCESS_KEY_ID": "AKIDTEST901",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-test-234",
    "AWS_SESSION_TOKEN": "aws-session-test-567",
}

# Environment variables that carry provider credentials: never inherited.
CREDENTIAL_VARS = re.compile(r"(_API_KEY|_ACCESS_TOKEN)$|^AWS_")


def http(method, url, body=None, headers=None, timeout=15):
    """(status, headers dict lowercased, body bytes); never raises on HTTP errors."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "content-type" not in {k.lower() for k in (headers or {})}:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def stop_process(proc, timeout=10):
    """SIGTERM, then SIGKILL after `timeout` seconds; waits for the end."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(predicate, timeout=10, interval=0.05):
    """Polls `predicate` until it holds. Counters move when Envoy ends the
    stream, just after the reply; histograms when Envoy merges them (every
    0.5 s in tests)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# A metric the native module defines shows on /stats/prometheus under its
# metrics namespace (`envoy_dynamicmodulescustom_<name>`, or without `envoy_`
# where Envoy strips the namespace); the Wasm build's under none.
NATIVE_METRIC_PREFIX = re.compile(rf"^(?:envoy_)?{re.escape(render.NATIVE_METRICS_NAMESPACE)}_")


def metric_name(prometheus_name):
    """A Prometheus metric name as the tests spell it, for either build."""
    return NATIVE_METRIC_PREFIX.sub("", prometheus_name)


class Envoy:
    """A real Envoy with the filter, configured from a plugin config dict."""

    def __init__(self, plugin_config, upstreams=None, env=None, concurrency=1, node=None,
                 downstream_tls=None, access_log_format="json", stats_inclusion_prefixes=None,
                 other_services=None, listener_metadata=None, dynamic_listener=False,
                 bootstrap_edit=None):
        self.port = free_port()
        self.admin_port = free_port()
        self.dir = tempfile.mkdtemp(prefix="meshllm-envoy-")
        self.log_path = os.path.join(self.dir, "envoy.log")
        self.access_log = os.path.join(self.dir, "access.log")
        bootstrap = render.render(
            plugin_config,
            build=BUILD,
            wasm=str(WASM),
            module=str(NATIVE),
            port=self.port,
            admin_port=self.admin_port,
            upstreams=upstreams,
            access_log_path=self.access_log,
            access_log_format=access_log_format,
            stats_flush_interval="0.5s",
            stats_inclusion_prefixes=stats_inclusion_prefixes,
            other_services=other_services,
            node=node,
            downstream_tls=downstream_tls,
            listener_metadata=listener_metadata,
        )
        # A test's own change to the rendered bootstrap (a timeout, say).
        if bootstrap_edit:
            bootstrap_edit(bootstrap)
        # With a file-based LDS the listener can be replaced while Envoy runs.
        self.lds_path = None
        if dynamic_listener:
            self.listener = copy.deepcopy(bootstrap["static_resources"]["listeners"][0])
            os.mkdir(os.path.join(self.dir, "lds"))
            self.lds_path = os.path.join(self.dir, "lds", "listeners.json")
            render.file_lds(bootstrap, self.lds_path)
        self.config_path = os.path.join(self.dir, "envoy.json")
        with open(self.config_path, "w") as f:
            json.dump(bootstrap, f, indent=1)
        # Only the keys we choose: nothing leaks in from the outer environment.
        clean = {k: v for k, v in os.environ.items() if not CREDENTIAL_VARS.search(k)}
        clean.update(env or {})
        if BUILD == "native" and node:
            clean.update(render.istio_agent_env(node, self.dir))
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [
                envoy_binary(),
                "-c", self.config_path,
                "--concurrency", str(concurrency),
                # Never a base id: another Envoy on the machine could hold it.
                "--disable-hot-restart",
                # Access-log lines reach the file within 0.2 s, not 10 s.
                "--file-flush-interval-msec", "200",
                "-l", os.environ.get("ENVOY_LOG_LEVEL", "warning"),
                "--component-log-level", LOG_COMPONENTS,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=clean,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"

    def wait_ready(self, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("envoy exited:\n" + self.log_text()[-4000:])
            try:
                status, _, body = http("GET", self.admin + "/ready", timeout=1)
                if status == 200 and body.strip() == b"LIVE":
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("envoy did not become ready:\n" + self.log_text()[-4000:])

    def set_listener_metadata(self, metadata):
        """Replaces the listener's metadata through the file-based LDS
        (`dynamic_listener=True`); Envoy swaps the listener in place and
        drains the old one. Returns the LDS update count to wait for."""
        assert self.lds_path, "start Envoy with dynamic_listener=True"
        before = self.stat("listener_manager.lds.update_success")
        self.listener["metadata"] = metadata
        if BUILD == "native":
            render.put_route_metadata(self.listener, metadata)
        render.write_lds(self.lds_path, [self.listener])
        return before + 1

    def stat(self, name):
        """One of Envoy's own counters or gauges (0 when absent)."""
        _, _, body = http("GET", self.admin + f"/stats?filter=^{re.escape(name)}$")
        for line in body.decode().splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    def wait_exit(self, timeout=20):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_text(self):
        self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def access_log_lines(self):
        try:
            with open(self.access_log) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def prometheus(self):
        _, _, body = http("GET", self.admin + "/stats/prometheus")
        return body.decode()

    def series(self, name):
        """Every series of metric `name` as (labels, value). A label with an
        empty value is absent, as Prometheus reads it (the native build
        defines each metric with all its labels and leaves unused ones
        empty)."""
        out = []
        for line in self.prometheus().splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$", line)
            if m and metric_name(m.group(1)) == name:
                labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
                labels = {k: v for k, v in labels.items() if v != ""}
                out.append((labels, float(m.group(3))))
        return out

    def metric(self, name, **labels):
        """The sum of the series of `name` that carry these labels (a label
        given as None must be absent); 0 when there are none."""
        want = {k: None if v is None else str(v) for k, v in labels.items()}
        return sum(
            value
            for got, value in self.series(name)
            if all(got.get(k) == v for k, v in want.items())
        )

    def stop(self):
        stop_process(self.proc)
        self.log.close()
        # Its config and logs go with it (MESHLLM_KEEP_ENVOY_DIRS=1 keeps them).
        if not os.environ.get("MESHLLM_KEEP_ENVOY_DIRS"):
            shutil.rmtree(self.dir, ignore_errors=True)


def gateway_plugin_config(dead_port, max_request_bytes=262144):
    """The shipped example config plus models that script mock behaviours."""
    with open(EXAMPLE_CONFIG) as f:
        cfg = json.load(f)
    cfg = copy.deepcopy(cfg)
    cfg["max_request_bytes"] = max_request_bytes
    cfg["providers"].append(
        {
            "name": "deadend",
            "kind": "openai_compatible",
            "base_url": f"http://127.0.0.1:{dead_port}/v1",
        }
    )
    cfg["models"] += [
        {"name": "err-429", "provider": "openai", "model": "mock-429"},
        {"name": "err-text", "provider": "openai", "model": "mock-500-text"},
        {"name": "err-detail", "provider": "groq", "model": "mock-400-detail"},
        {"name": "leak", "provider": "openai", "model": "mock-echo-key"},
        {"name": "gated", "provider": "openai", "model": "mock-gated"},
        {"name": "dead-model", "provider": "deadend", "model": "x"},
        {"name": "claude-overloaded", "provider": "anthropic", "model": "mock-overloaded"},
        {"name": "claude-cut", "provider": "anthropic", "model": "mock-cut"},
        {"name": "gemini-429", "provider": "gemini", "model": "mock-429"},
        {"name": "gemini-cut", "provider": "gemini", "model": "mock-cut"},
        {"name": "bedrock-429", "provider": "bedrock", "model": "mock-429"},
        {"name": "bedrock-cut", "provider": "bedrock", "model": "mock-cut"},
        {"name": "openai-cut", "provider": "openai", "model": "mock-cut"},
        # OpenAI's other endpoints (tests/test_openai_surface.py).
        {"name": "instruct", "provider": "openai", "model": "gpt-3.5-turbo-instruct"},
        {"name": "whisper", "provider": "openai", "model": "whisper-1"},
        {"name": "tts", "provider": "openai", "model": "tts-1"},
        {"name": "image-editor", "provider": "openai", "model": "gpt-image-1"},
        {"name": "dall-e-2", "provider": "openai"},
        {"name": "omni-moderation-latest", "provider": "openai"},
        {"name": "azure-instruct", "provider": "azure", "model": "gpt-35-instruct",
         "deployment": "instruct-prod"},
    ]
    return cfg


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "envoy: loads the gateway into Envoy (takes the `wasm` fixture); run for "
        "each build")
    config.addinivalue_line(
        "markers", "wasm_only(reason): only the Wasm build has this (Istio's WasmPlugin, OCI "
        "packaging of the .wasm, the Wasm VM); skipped with MESHLLM_BUILD=native")


def pytest_report_header(config):
    return f"meshllm build: {BUILD} ({ARTIFACT.relative_to(ROOT)})"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "wasm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.envoy)
        only = item.get_closest_marker("wasm_only")
        if only and BUILD != "wasm":
            why = only.args[0] if only.args else only.kwargs.get("reason", "")
            item.add_marker(pytest.mark.skip(reason=f"wasm only: {why}".rstrip(": ")))


@pytest.fixture(scope="session")
def wasm():
    """The built gateway of this run's build (MESHLLM_BUILD): meshllm.wasm,
    or libmeshllm.so for native. A missing artifact fails, never skips."""
    if not ARTIFACT.exists():
        pytest.fail(f"{ARTIFACT} is missing (MESHLLM_BUILD={BUILD}): run `{BUILD_COMMAND}` first")
    return ARTIFACT


@pytest.fixture(scope="session")
def mocks():
    servers = {
        "openai": MockProvider(label="openai").start(),
        "azure": MockProvider(label="azure").start(),
        "groq": MockProvider(label="groq").start(),
        "anthropic": MockProvider(label="anthropic").start(),
        "gemini": MockProvider(label="gemini").start(),
        "vertex": MockProvider(label="vertex").start(),
        "bedrock": MockProvider(label="bedrock", aws_key_id=KEYS["AWS_ACCESS_KEY_ID"],
                                aws_secret=KEYS["AWS_SECRET_ACCESS_KEY"],
                                aws_token=KEYS["AWS_SESSION_TOKEN"]).start(),
    }
    yield servers
    for s in servers.values():
        s.stop()


@pytest.fixture(scope="session")
def gateway(wasm, mocks):
    dead_port = free_port()  # nothing listens there
    cfg = gateway_plugin_config(dead_port)
    upstreams = {name: ("127.0.0.1", m.port) for name, m in mocks.items()}
    env = Envoy(cfg, upstreams=upstreams, env=KEYS)
    try:
        env.wait_ready()
        env.plugin_config = cfg
        yield env
    finally:
        env.stop()


@pytest.fixture(autouse=True)
def _fresh_mocks(request):
    """Each test sees only the requests it caused."""
    if "mocks" in request.fixturenames:
        mocks = request.getfixturevalue("mocks")
        for m in mocks.values():
            m.take()
            m.gate.clear()
    yield
