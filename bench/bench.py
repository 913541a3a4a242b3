#!/usr/bin/env python3
"""meshllm's benchmark: direct to a mock provider, through plain Envoy (same
listener, no filter) and through Envoy with meshllm, side by side in one run:
the Wasm filter and the native dynamic module, each beside an empty filter of
its kind (the floor).

Envoy runs one worker pinned to the last core; the mock provider and the
clients share the other cores. Scenarios alternate between the targets
round by round, so a slow moment of the machine hits them all; each figure
is the median over rounds. Results go to bench/results/ as JSON and a
markdown table, with the machine, the date and the method. See
bench/README.md."""

import argparse
import datetime
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "envoy" / "tools"))

import render  # noqa: E402
from run import envoy_binary  # noqa: E402

WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "meshllm.wasm"
TOOL = ROOT / "bench" / "target" / "release" / "meshllm-bench"
NULL_WASM = ROOT / "bench" / "nullfilter" / "target" / "wasm32-wasip1" / "release" / "meshllm_nullfilter.wasm"
# The native build (an Envoy dynamic module, `--module`) and the empty native
# module (bench/nativefloor, built by `make bench-build`).
MODULE = ROOT / render.NATIVE_DEFAULT
NATIVE_FLOOR = ROOT / "bench" / "nativefloor" / "target" / "release" / "libmeshllm_nativefloor.so"

# The gateway as a sidecar runs it: the caller from the node metadata, an
# alias rewritten to the provider's model, a quota every request is checked
# against, metrics on, failover on (the default).
PLUGIN_CONFIG = {
    "providers": [
        {"name": "openai", "kind": "openai", "api_key_env": "OPENAI_API_KEY"},
        {"name": "anthropic", "kind": "anthropic", "api_key_env": "ANTHROPIC_API_KEY"},
    ],
    "models": [
        {"name": "gpt-4o-mini", "provider": "openai", "model": "gpt-4o-mini-2024-07-18",
         "aliases": ["mini"]},
        {"name": "claude", "provider": "anthropic", "model": "claude-sonnet-4-5"},
    ],
    "identity": {"source": "mesh_node"},
    "quotas": {"limits": [
        {"name": "bench", "match": {"namespace": "bench", "service": "*"},
         "requests_per_minute": 1000000000, "tokens_per_minute": 1000000000000},
    ]},
    "max_request_bytes": 4 * 1024 * 1024,
}
# The `guarded` target: meshllm's config with every built-in guardrail on
# requests and answers (what the bench's prose prompt never trips, so the
# figure is the screening itself: reading every string, finding nothing).
GUARDRAILS = {"rules": [
    {"name": "pii", "pii": True, "action": "redact"},
    {"name": "secrets", "secrets": True, "action": "block"},
    {"name": "deny", "keywords": ["project falcon", "internal only"],
     "regexes": ["(?i)confidential\\s+\\d+"], "action": "block"},
    {"name": "injection", "prompt_injection": {"threshold": 0.5}, "action": "block"},
]}
# The `cached` target: meshllm's config with the response cache on for every
# request (the bench's prompts set no temperature, hence `sampled`); the
# client repeats one request, so every one after the first is a hit.
CACHE = {"sampled": True, "ttl_s": 3600, "max_entry_bytes": 8 * 1024 * 1024}
KEYS = {"OPENAI_API_KEY": "sk-bench", "ANTHROPIC_API_KEY": "sk-ant-bench"}
NODE = {
    "id": "sidecar~10.0.0.9~client.bench~bench.svc.cluster.local",
    "cluster": "client.bench",
    "metadata": {"NAMESPACE": "bench", "WORKLOAD_NAME": "client-v1",
                 "LABELS": {"app": "client", "service.istio.io/canonical-name": "client"}},
}


KB = 1024
MB = 1024 * 1024
# The host the bench client sends (bench/src/client.rs), as the
# `sidecar_other` target's ordinary service.
SIDECAR_OTHER_HOST = "llm.bench"
WEBDIS_CONFIG = ROOT / "envoy" / "webdis.json"
STORE_TARGETS = ("shared", "leased")


def store_config(lease):
    """meshllm's config with its quota rule counted in the shared store:
    exact (a store round trip per request) or leased (one proxy, the default
    lease of a tenth of the limit: nearly every request from the lease)."""
    cfg = json.loads(json.dumps(PLUGIN_CONFIG))
    rule = cfg["quotas"]["limits"][0]
    rule["shared"] = True
    if lease:
        rule["lease"] = {"proxies": 1}
    cfg["quotas"]["store"] = {"cluster": "quota_store", "timeout_ms": 1000, "on_failure": "closed"}
    return cfg


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Profile:
    """How much to measure: `full` for the record, `quick` to check the
    harness works (tests)."""

    def __init__(self, quick):
        self.name = "quick" if quick else "full"
        self.rounds = 1 if quick else 3
        self.latency_requests = {1 * KB: 200, 100 * KB: 50, 1 * MB: 10} if quick else \
            {1 * KB: 3000, 100 * KB: 800, 1 * MB: 150}
        self.stream_requests = 5 if quick else 60
        self.stream_events = 10 if quick else 20
        self.stream_gap_us = 1000
        self.load_seconds = 0.5 if quick else 5.0
        self.connections = 16
        self.memory_warmup = 1000 if quick else 20000
        self.memory_requests = 2000 if quick else 100000


class Proc:
    """A process we started, stopped by PID."""

    def __init__(self, argv, log, env=None, cpus=None, capture_stdout=False):
        if cpus:
            argv = ["taskset", "-c", cpus] + argv
        self.log = open(log, "w")
        self.proc = subprocess.Popen(argv, env=env, stderr=self.log,
                                     stdout=subprocess.PIPE if capture_stdout else self.log)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def start_store(work, cpus):
    """redis-server (no persistence) and webdis with the shipped config, on
    free ports and the non-Envoy cores; (procs, webdis port)."""
    redis_port, webdis_port = free_port(), free_port()
    redis = Proc(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                  "--save", "", "--appendonly", "no"], os.path.join(work, "redis.log"), cpus=cpus)
    cfg = json.loads(WEBDIS_CONFIG.read_text())
    cfg.update({"redis_port": redis_port, "http_port": webdis_port, "daemonize": False,
                "logfile": os.path.join(work, "webdis.log")})
    cfg.pop("pidfile", None)
    path = os.path.join(work, "webdis.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    webdis = Proc(["webdis", path], os.path.join(work, "webdis.out"), cpus=cpus)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{webdis_port}/EVAL/return%201/0",
                                        timeout=1) as r:
                if r.status == 200:
                    return [redis, webdis], webdis_port
        except OSError:
            pass
        time.sleep(0.1)
    for p in (webdis, redis):
        p.stop()
    logs = "".join(Path(work, n).read_text()[-1500:] for n in ("redis.log", "webdis.log")
                   if Path(work, n).exists())
    raise SystemExit("redis-server and webdis did not start:\n" + logs)


def cpu_sets():
    """(Envoy's core, the others) as taskset lists."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return str(cpus[-1]), ",".join(str(c) for c in cpus[:-1])


def plain_bootstrap(bootstrap, mock_port):
    """The same listener and connection manager with the router only,
    routing every request straight to the mock."""
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]
    hcm["http_filters"] = [render.router_filter()]
    for vhost in hcm["route_config"]["virtual_hosts"]:
        vhost.pop("include_request_attempt_count", None)
        vhost.pop("typed_per_filter_config", None)
        vhost["routes"] = [{"match": {"prefix": "/"},
                            "route": {"cluster": "mock", "timeout": "600s"}}]
    bootstrap["static_resources"]["clusters"] = [render.cluster("mock", "127.0.0.1", mock_port, False)]
    return bootstrap


def floor_bootstrap(bootstrap, mock_port, native=False):
    """Plain Envoy plus an empty filter where meshllm's two halves run
    (before the router, and on the upstream cluster): what any filter that
    reads the body costs here, before it does anything. The empty Wasm
    filter (bench/nullfilter), or with `native` the empty dynamic module
    (bench/nativefloor)."""
    bootstrap = plain_bootstrap(bootstrap, mock_port)
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]
    if native:
        def half(upstream):
            return render.native_filter({}, str(NATIVE_FLOOR), upstream=upstream)
    else:
        code = render.local_code(str(NULL_WASM))

        def half(upstream):
            return render.wasm_filter({}, code, [], upstream=upstream)
    hcm["http_filters"].insert(0, half(False))
    upstream = render.upstream_http_filters(half(True))
    bootstrap["static_resources"]["clusters"][0]["typed_extension_protocol_options"] = \
        render.upstream_protocol_options(upstream)
    return bootstrap


def without_gateway_filters(bootstrap):
    """The bootstrap with the router as its only HTTP filter."""
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]
    hcm["http_filters"] = [render.router_filter()]
    for vhost in hcm["route_config"]["virtual_hosts"]:
        vhost.pop("typed_per_filter_config", None)
    return bootstrap


def native_availability(module, native_floor):
    """(the native targets that can run, a note on those that cannot): each
    needs its module on disk; a missing one is left out, not a failure."""
    targets, missing = [], []
    for name, path, how in (("native_floor", native_floor, "make bench-build"),
                            ("native", module, "build the native module, or pass --module")):
        if Path(path).exists():
            targets.append(name)
        else:
            missing.append(f"{name} ({path} is missing: {how})")
    note = f"not measured: {'; '.join(missing)}" if missing else None
    return targets, note


class Envoy:
    def __init__(self, name, bootstrap, workdir, cpus, env):
        self.name = name
        self.admin_port = bootstrap["admin"]["address"]["socket_address"]["port_value"]
        self.port = bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"][
            "port_value"]
        path = os.path.join(workdir, f"{name}.json")
        with open(path, "w") as f:
            json.dump(bootstrap, f)
        self.log_path = os.path.join(workdir, f"{name}.log")
        clean = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        clean.update(env)
        self.proc = Proc([envoy_binary(), "-c", path, "--concurrency", "1",
                          "--disable-hot-restart", "-l", "warning"],
                         self.log_path, env=clean, cpus=cpus)
        self.addr = f"127.0.0.1:{self.port}"

    def wait_ready(self):
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.proc.poll() is not None:
                raise SystemExit(f"{self.name} envoy exited:\n" + Path(self.log_path).read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
                    if r.read().strip() == b"LIVE":
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"{self.name} envoy did not become ready")

    def cpu_seconds(self):
        """User plus system CPU time Envoy has used so far."""
        with open(f"/proc/{self.proc.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self):
        """Envoy's resident memory (its own PID, not taskset's: taskset execs)."""
        with open(f"/proc/{self.proc.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self):
        self.proc.stop()


class Bench:
    def __init__(self, profile, client_cpus):
        self.profile = profile
        self.client_cpus = client_cpus

    def tool(self, command, addr, model, size, path="/v1/chat/completions", **opts):
        argv = [str(TOOL), command, "--addr", addr, "--path", path, "--model", model,
                "--size", str(size)]
        for k, v in opts.items():
            argv += [f"--{k.replace('_', '-')}", str(v)]
        if self.client_cpus:
            argv = ["taskset", "-c", self.client_cpus] + argv
        out = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {out.stderr.strip()}")
        return json.loads(out.stdout)


def cache_outcomes(envoy):
    """The cache's lookups by outcome, from the Envoy's own metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{envoy.admin_port}/stats/prometheus",
                                timeout=5) as r:
        text = r.read().decode()
    out = {"hit": 0, "miss": 0}
    for line in text.splitlines():
        m = re.match(r'^meshllm_cache_lookups_total\{(.*)\}\s+(\S+)$', line)
        outcome = m and re.search(r'outcome="(\w+)"', m.group(1))
        if outcome:
            out[outcome.group(1)] = out.get(outcome.group(1), 0) + int(float(m.group(2)))
    return out


def interleaved(profile, targets, measure):
    """`measure(target, addr)` for every target, round after round, so a slow
    moment of the machine falls on all of them; results by target."""
    rounds = {t: [] for t in targets}
    for _ in range(profile.rounds):
        for t, addr in targets.items():
            rounds[t].append(measure(t, addr))
    return rounds


def median_of(rounds, *keys):
    """The median over rounds of a nested figure."""
    values = []
    for r in rounds:
        for k in keys:
            r = r[k]
        values.append(r)
    return round(statistics.median(values), 1)


def machine():
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    envoy_version = subprocess.run([envoy_binary(), "--version"], capture_output=True,
                                   text=True).stdout.strip().splitlines()
    commit = subprocess.run(["git", "-C", str(WASM.parent), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "envoy": envoy_version[-1] if envoy_version else "unknown",
        "commit": commit or "unknown",
        "wasm_bytes": WASM.stat().st_size,
        "module_bytes": MODULE.stat().st_size if MODULE.exists() else None,
    }


def run(profile, out_dir, label=""):
    envoy_cpu, client_cpus = cpu_sets()
    work = tempfile.mkdtemp(prefix="meshllm-bench-")
    procs = []
    try:
        mock = Proc([str(TOOL), "mock"], os.path.join(work, "mock.log"), cpus=client_cpus,
                    capture_stdout=True)
        procs.append(mock)
        mock_port = int(mock.proc.stdout.readline())
        upstreams = {"openai": ("127.0.0.1", mock_port), "anthropic": ("127.0.0.1", mock_port)}

        def bootstrap():
            return render.render(PLUGIN_CONFIG, wasm=str(WASM), port=free_port(),
                                 admin_port=free_port(), upstreams=upstreams, node=NODE)

        plain = Envoy("plain", plain_bootstrap(bootstrap(), mock_port), work, envoy_cpu, {})
        procs.append(plain)
        floor = Envoy("floor", floor_bootstrap(bootstrap(), mock_port), work, envoy_cpu, {})
        procs.append(floor)
        meshllm = Envoy("meshllm", bootstrap(), work, envoy_cpu, KEYS)
        procs.append(meshllm)
        # A pod's other traffic through a sidecar with meshllm installed: the
        # same bootstrap, the request's host an ordinary service's, so the
        # route it takes does not enable meshllm's (disabled) filters.
        def sidecar_bootstrap():
            return render.render(
                PLUGIN_CONFIG, wasm=str(WASM), port=free_port(), admin_port=free_port(),
                upstreams=upstreams, node=NODE,
                other_services={SIDECAR_OTHER_HOST: ("127.0.0.1", mock_port)})
        sidecar_other = Envoy("sidecar_other", sidecar_bootstrap(), work, envoy_cpu, KEYS)
        procs.append(sidecar_other)
        # The same routes and clusters without meshllm's filters: what the
        # filters' presence costs, apart from the configuration around them.
        sidecar_plain = Envoy("sidecar_plain", without_gateway_filters(sidecar_bootstrap()), work,
                              envoy_cpu, {})
        procs.append(sidecar_plain)
        envoys = {"plain": plain, "floor": floor, "meshllm": meshllm}
        guarded = Envoy("guarded", render.render(
            dict(PLUGIN_CONFIG, guardrails=GUARDRAILS), wasm=str(WASM), port=free_port(),
            admin_port=free_port(), upstreams=upstreams, node=NODE), work, envoy_cpu, KEYS)
        procs.append(guarded)
        cached = Envoy("cached", render.render(
            dict(PLUGIN_CONFIG, cache=CACHE), wasm=str(WASM), port=free_port(),
            admin_port=free_port(), upstreams=upstreams, node=NODE), work, envoy_cpu, KEYS)
        procs.append(cached)

        # The native build beside them: the same gateway config as a dynamic
        # module, and the empty module, where their modules are on disk.
        native_targets, native_note = native_availability(MODULE, NATIVE_FLOOR)
        if native_note:
            print(f"native targets {native_note}", file=sys.stderr)
        for name in native_targets:
            if name == "native":
                envoy = Envoy(name, render.render(
                    PLUGIN_CONFIG, build="native", module=str(MODULE), port=free_port(),
                    admin_port=free_port(), upstreams=upstreams, node=NODE), work, envoy_cpu,
                    dict(KEYS, **render.istio_agent_env(NODE, work)))
            else:
                envoy = Envoy(name, floor_bootstrap(bootstrap(), mock_port, native=True), work,
                              envoy_cpu, {})
            procs.append(envoy)
            envoys[name] = envoy
        for envoy in [*envoys.values(), sidecar_other, sidecar_plain, guarded, cached]:
            envoy.wait_ready()
        memory_start = {name: envoy.rss_kib() for name, envoy in envoys.items()}

        # The shared store's cost, only where its tools are installed.
        store_envoys = {}
        store_note = None
        missing = [b for b in ("redis-server", "webdis") if not shutil.which(b)]
        if missing:
            store_note = f"not measured: {' and '.join(missing)} not on PATH (make test-tools)"
            print(f"store targets {store_note}", file=sys.stderr)
        else:
            store_procs, webdis_port = start_store(work, client_cpus)
            procs.extend(store_procs)
            store_upstreams = dict(upstreams, quota_store=("127.0.0.1", webdis_port))
            for name in STORE_TARGETS:
                cfg = store_config(lease=name == "leased")
                envoy = Envoy(name, render.render(
                    cfg, wasm=str(WASM), port=free_port(), admin_port=free_port(),
                    upstreams=store_upstreams, node=NODE), work, envoy_cpu, KEYS)
                procs.append(envoy)
                store_envoys[name] = envoy
            for envoy in store_envoys.values():
                envoy.wait_ready()
        store_targets = {n: e.addr for n, e in store_envoys.items()}
        # Targets measured on passthrough 1 KB only (latency and throughput).
        extra_envoys = dict(store_envoys, sidecar_other=sidecar_other, sidecar_plain=sidecar_plain)
        extra_targets = {n: e.addr for n, e in extra_envoys.items()}

        bench = Bench(profile, client_cpus)
        targets = {"direct": f"127.0.0.1:{mock_port}", "plain": plain.addr, "floor": floor.addr,
                   "meshllm": meshllm.addr, **{n: envoys[n].addr for n in native_targets}}
        # (scenario, model meshllm routes, sizes): the alias `mini` is an
        # OpenAI model, `claude` an Anthropic one the request is translated for.
        kinds = [("passthrough", "mini"), ("translate", "claude")]

        latency = []
        for kind, model in kinds:
            for size in (1 * KB, 100 * KB, 1 * MB):
                n = profile.latency_requests[size]
                # The extra targets join the passthrough 1 KB rounds only,
                # the guarded and cached ones passthrough 1 KB and 100 KB.
                with_extra = kind == "passthrough" and size == KB
                these = dict(targets, **extra_targets) if with_extra else dict(targets)
                if kind == "passthrough" and size in (KB, 100 * KB):
                    these["guarded"] = guarded.addr
                    these["cached"] = cached.addr
                rounds = interleaved(profile, these, lambda t, addr: bench.tool(
                    "latency", addr, model, size, requests=n, warmup=max(5, n // 10)))
                row = {"scenario": kind, "body_bytes": size, "requests": n}
                for t in these:
                    row[t] = {p: median_of(rounds[t], p) for p in ("p50_us", "p99_us")}
                row["added_p50_us"] = round(row["meshllm"]["p50_us"] - row["plain"]["p50_us"], 1)
                row["added_p99_us"] = round(row["meshllm"]["p99_us"] - row["plain"]["p99_us"], 1)
                row["floor_added_p50_us"] = round(row["floor"]["p50_us"] - row["plain"]["p50_us"], 1)
                if "native" in row:
                    row["native_added_p50_us"] = round(
                        row["native"]["p50_us"] - row["plain"]["p50_us"], 1)
                    row["native_added_p99_us"] = round(
                        row["native"]["p99_us"] - row["plain"]["p99_us"], 1)
                if "native_floor" in row:
                    row["native_floor_added_p50_us"] = round(
                        row["native_floor"]["p50_us"] - row["plain"]["p50_us"], 1)
                if "guarded" in row:
                    row["guardrails_added_p50_us"] = round(
                        row["guarded"]["p50_us"] - row["meshllm"]["p50_us"], 1)
                if "cached" in row:
                    row["cache_hit_vs_plain_p50_us"] = round(
                        row["cached"]["p50_us"] - row["plain"]["p50_us"], 1)
                latency.append(row)
                print(f"latency {kind} {size}: {row}", file=sys.stderr)

        cache_hits = cache_outcomes(cached)

        throughput = []
        for kind, model in kinds:
            def load(t, addr):
                envoy = envoys.get(t) or extra_envoys.get(t)
                cpu_before = envoy.cpu_seconds() if envoy else 0
                r = bench.tool("load", addr, model, 1 * KB, connections=profile.connections,
                               seconds=profile.load_seconds)
                if envoy:
                    r["cpu_us_per_request"] = \
                        1e6 * (envoy.cpu_seconds() - cpu_before) / max(r["ok"], 1)
                return r

            these = dict(targets, **extra_targets) if kind == "passthrough" else targets
            rounds = interleaved(profile, these, load)
            row = {"scenario": kind, "body_bytes": 1 * KB, "connections": profile.connections}
            for t in these:
                row[t] = {"rps": median_of(rounds[t], "rps"),
                          "failed": sum(r["failed"] for r in rounds[t])}
                if t in envoys or t in extra_envoys:
                    row[t]["cpu_us_per_request"] = median_of(rounds[t], "cpu_us_per_request")
                    cpus = [r["cpu_us_per_request"] for r in rounds[t]]
                    # Round to round, what the machine alone moves it by.
                    row[t]["cpu_spread_us"] = round(max(cpus) - min(cpus), 1)
            row["ratio_to_plain"] = round(row["meshllm"]["rps"] / max(row["plain"]["rps"], 1), 3)
            row["floor_ratio_to_plain"] = round(row["floor"]["rps"] / max(row["plain"]["rps"], 1), 3)
            for t in native_targets:
                row[f"{t}_ratio_to_plain"] = round(row[t]["rps"] / max(row["plain"]["rps"], 1), 3)
            throughput.append(row)
            print(f"throughput {kind}: {row}", file=sys.stderr)

        streaming = []
        for kind, model in kinds:
            rounds = interleaved(profile, targets, lambda t, addr: bench.tool(
                "stream", addr, model, 1 * KB, requests=profile.stream_requests,
                warmup=max(2, profile.stream_requests // 10), events=profile.stream_events,
                gap_us=profile.stream_gap_us))
            row = {"scenario": kind, "events_per_stream": profile.stream_events,
                   "gap_us": profile.stream_gap_us}
            for t in targets:
                row[t] = {
                    "ttfb_p50_us": median_of(rounds[t], "ttfb", "p50_us"),
                    "ttfb_p99_us": median_of(rounds[t], "ttfb", "p99_us"),
                    "event_delay_p50_us": median_of(rounds[t], "event_delay", "p50_us"),
                    "event_delay_p99_us": median_of(rounds[t], "event_delay", "p99_us"),
                    "events": sum(r["events"] for r in rounds[t]),
                    "held_back": sum(r["held_back"] for r in rounds[t]),
                }
            row["added_ttfb_p50_us"] = round(
                row["meshllm"]["ttfb_p50_us"] - row["plain"]["ttfb_p50_us"], 1)
            row["added_event_delay_p50_us"] = round(
                row["meshllm"]["event_delay_p50_us"] - row["plain"]["event_delay_p50_us"], 1)
            if "native" in row:
                row["native_added_ttfb_p50_us"] = round(
                    row["native"]["ttfb_p50_us"] - row["plain"]["ttfb_p50_us"], 1)
                row["native_added_event_delay_p50_us"] = round(
                    row["native"]["event_delay_p50_us"] - row["plain"]["event_delay_p50_us"], 1)
            streaming.append(row)
            print(f"streaming {kind}: {row}", file=sys.stderr)

        memory = {}
        for name, envoy in envoys.items():
            half_warm, half = profile.memory_warmup // 2, profile.memory_requests // 2
            for model in ("mini", "claude"):
                bench.tool("load", envoy.addr, model, 1 * KB, connections=profile.connections,
                           total=half_warm)
            warm = envoy.rss_kib()
            failed = 0
            for model in ("mini", "claude"):
                failed += bench.tool("load", envoy.addr, model, 1 * KB,
                                     connections=profile.connections, total=half)["failed"]
            after = envoy.rss_kib()
            memory[name] = {"start_kib": memory_start[name], "warm_kib": warm,
                            "after_kib": after, "growth_kib": after - warm,
                            "requests_after_warmup": 2 * half, "failed": failed}
        memory["filter_kib"] = memory["meshllm"]["after_kib"] - memory["plain"]["after_kib"]
        if "native" in memory:
            memory["native_kib"] = memory["native"]["after_kib"] - memory["plain"]["after_kib"]
        print(f"memory: {memory}", file=sys.stderr)
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "profile": profile.name,
        "machine": machine(),
        "method": method(profile, envoy_cpu, client_cpus),
        "latency": latency,
        "throughput": throughput,
        "streaming": streaming,
        "memory": memory,
    }
    result["store"] = store_cost(latency, throughput, list(store_targets), store_note)
    result["sidecar_other"] = sidecar_cost(latency, throughput)
    result["guardrails"] = {
        f"{size_name(r['body_bytes'])}": {"guarded_p50_us": r["guarded"]["p50_us"],
                                          "meshllm_p50_us": r["meshllm"]["p50_us"],
                                          "added_p50_us": r["guardrails_added_p50_us"]}
        for r in latency if "guarded" in r}
    result["cache"] = {
        f"{size_name(r['body_bytes'])}": {"cached_p50_us": r["cached"]["p50_us"],
                                          "meshllm_p50_us": r["meshllm"]["p50_us"],
                                          "plain_p50_us": r["plain"]["p50_us"],
                                          "direct_p50_us": r["direct"]["p50_us"],
                                          "hit_vs_plain_p50_us": r["cache_hit_vs_plain_p50_us"]}
        for r in latency if "cached" in r}
    result["cache_hits"] = cache_hits
    result["native"] = {"targets": native_targets, "note": native_note,
                        "module": str(MODULE) if "native" in native_targets else None}
    result["budget"] = budget(result)
    result["native_budget"] = native_budget(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = "-".join(p for p in (stamp, label, profile.name) if p)
    json_path = out_dir / f"{name}.json"
    md_path = out_dir / f"{name}.md"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(markdown(result))
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return result


def store_cost(latency, throughput, names, note):
    """The shared store's cost for passthrough 1 KB: each store target's
    figures and what it adds over meshllm with local quotas."""
    if not names:
        return {"note": note, "targets": {}}
    lat = next(r for r in latency if r["scenario"] == "passthrough" and r["body_bytes"] == KB)
    tput = next(r for r in throughput if r["scenario"] == "passthrough")
    local = {**lat["meshllm"], **tput["meshllm"]}
    out = {}
    for name in names:
        x = {**lat[name], **tput[name]}
        x["added_p50_us"] = round(x["p50_us"] - local["p50_us"], 1)
        x["added_p99_us"] = round(x["p99_us"] - local["p99_us"], 1)
        x["added_cpu_us_per_request"] = round(x["cpu_us_per_request"] - local["cpu_us_per_request"], 1)
        x["ratio_to_meshllm"] = round(x["rps"] / max(local["rps"], 1), 3)
        out[name] = x
    return {"note": "passthrough 1 KB; added = the target minus meshllm (local quotas); "
                    "shared = the quota rule exact in the store (a webdis+Redis round trip "
                    "per request), leased = the same rule with a lease for one proxy",
            "meshllm": local, "targets": out}


def sidecar_cost(latency, throughput):
    """What a pod's other (non-LLM) traffic pays for meshllm in its sidecar:
    passthrough 1 KB through `sidecar_other` against the same routes and
    clusters without meshllm's filters (`sidecar_plain`), and plain Envoy."""
    lat = next(r for r in latency if r["scenario"] == "passthrough" and r["body_bytes"] == KB)
    tput = next(r for r in throughput if r["scenario"] == "passthrough")
    plain, base, other = ({**lat[t], **tput[t]} for t in ("plain", "sidecar_plain", "sidecar_other"))
    return {
        "plain": plain, "sidecar_plain": base, "sidecar_other": other,
        "added_p50_us": round(other["p50_us"] - base["p50_us"], 1),
        "added_cpu_us_per_request": round(other["cpu_us_per_request"] - base["cpu_us_per_request"], 1),
        # The two targets' own round-to-round spread: what "nothing
        # measurable" means in this run.
        "noise_cpu_us": max(base["cpu_spread_us"], other["cpu_spread_us"], 1.0),
        "ratio": round(other["rps"] / max(base["rps"], 1), 3),
    }


def method(profile, envoy_cpu, client_cpus):
    return {
        "envoy": f"--concurrency 1, pinned to cpu {envoy_cpu}" if envoy_cpu else "--concurrency 1, unpinned",
        "clients_and_mock": f"cpus {client_cpus}" if client_cpus else "unpinned",
        "mock": "bench/src/mock.rs: canned replies, a thread per connection",
        "targets": "direct = the mock itself; plain = the same Envoy listener and connection "
                   "manager with only the router; floor = plain plus an empty Wasm filter "
                   "(bench/nullfilter: pauses, reads the body) before the router and on the "
                   "upstream cluster, where meshllm's halves run; meshllm = the gateway config "
                   "in bench/bench.py (mesh_node identity, alias rewrite, quota, metrics, "
                   "failover clusters); native_floor = floor with an empty Envoy dynamic module "
                   "(bench/nativefloor) in both places instead; native = meshllm's config with "
                   "the native build (libmeshllm.so) in both halves; sidecar_other = meshllm's "
                   "bootstrap serving a host that is not an LLM host (a pod's other traffic "
                   "through its sidecar), sidecar_plain = the same without meshllm's filters; "
                   "passthrough 1 KB only; guarded = meshllm's config with every built-in "
                   "guardrail on (bench/bench.py GUARDRAILS), passthrough 1 KB and 100 KB; "
                   "cached = meshllm's config with the response cache on (bench/bench.py "
                   "CACHE), the same request repeated: every request after the first a hit "
                   "answered by the proxy, passthrough 1 KB and 100 KB",
        "latency": "one keep-alive connection, closed loop; added = meshllm (or native) minus plain",
        "throughput": f"{profile.connections} keep-alive connections, closed loop, "
                      f"{profile.load_seconds} s per target and round",
        "streaming": f"{profile.stream_events} events {profile.stream_gap_us} us apart; "
                     "event delay = client read time minus the mock's write stamp; an event "
                     "more than half a gap late counts as held back",
        "memory": f"VmRSS after {profile.memory_warmup} warm-up requests and after "
                  f"{profile.memory_requests} more (half passthrough, half translated)",
        "rounds": f"{profile.rounds}, targets interleaved, medians over rounds",
    }


def budget(result):
    """The Wasm build's budget (issue 23: its own cost above the empty
    filter's floor, measured in the same run), judged on this run's figures."""
    def lat(kind, size):
        return next(r for r in result["latency"] if r["scenario"] == kind and r["body_bytes"] == size)

    def tput(kind):
        return next(r for r in result["throughput"] if r["scenario"] == kind)

    def stream(kind):
        return next(r for r in result["streaming"] if r["scenario"] == kind)

    def cpu_over_floor(kind):
        x = tput(kind)
        return round(x["meshllm"]["cpu_us_per_request"] - x["floor"]["cpu_us_per_request"], 1)

    def over_floor(row, key):
        return round(row["meshllm"][key] - row["floor"][key], 1)

    side = result["sidecar_other"]
    items = [
        ("Envoy CPU per request above the floor, passthrough 1 KB", cpu_over_floor("passthrough"),
         "<=", 20, "us"),
        ("Envoy CPU per request above the floor, OpenAI to Anthropic 1 KB",
         cpu_over_floor("translate"), "<=", 35, "us"),
        ("added p50 above the floor, passthrough 1 KB", over_floor(lat("passthrough", KB), "p50_us"),
         "<=", 25, "us"),
        ("added p50 above the floor, OpenAI to Anthropic 1 KB",
         over_floor(lat("translate", KB), "p50_us"), "<=", 40, "us"),
        ("added TTFB p50 above the floor, passthrough stream",
         over_floor(stream("passthrough"), "ttfb_p50_us"), "<=", 40, "us"),
        ("added TTFB p50 above the floor, translated stream",
         over_floor(stream("translate"), "ttfb_p50_us"), "<=", 40, "us"),
        ("added delay per event p50 above the floor (worst scenario)",
         max(over_floor(stream(k), "event_delay_p50_us") for k in ("passthrough", "translate")),
         "<=", 5, "us"),
        ("a sidecar's other traffic: Envoy CPU per request, meshllm installed over not",
         side["added_cpu_us_per_request"], "<=", side["noise_cpu_us"],
         "us (limit: the two targets' round-to-round spread)"),
        ("added p50, OpenAI to Anthropic 1 MB", lat("translate", MB)["added_p50_us"], "<=", 5000, "us"),
        ("RSS growth after warm-up", result["memory"]["meshllm"]["growth_kib"]
         - max(result["memory"]["plain"]["growth_kib"], 0), "<=", 1024, "KiB beyond plain's"),
    ]
    return judged(items)


def judged(items):
    """Budget lines (name, value, op, limit, unit[, figures]) as met or not."""
    out = []
    for name, value, op, limit, unit, *figures in items:
        ok = value <= limit if op == "<=" else value >= limit
        line = {"item": name, "value": value, "limit": f"{op} {limit}", "unit": unit, "met": ok}
        if figures:
            line["figures"] = figures[0]
        out.append(line)
    return out


def native_budget(result):
    """The native build's budget (issue 22), judged on this run's figures;
    empty when the native build was not measured."""
    if "native" not in result["native"]["targets"]:
        return []
    lat = next(r for r in result["latency"]
               if r["scenario"] == "passthrough" and r["body_bytes"] == KB)
    tput = {r["scenario"]: r for r in result["throughput"]}
    mem = result["memory"]

    def rps(kind):
        return f"native {tput[kind]['native']['rps']} / plain {tput[kind]['plain']['rps']} requests/s"

    growth = mem["native"]["growth_kib"] - max(mem["plain"]["growth_kib"], 0)
    return judged([
        ("native throughput, passthrough 1 KB", tput["passthrough"]["native_ratio_to_plain"],
         ">=", 0.9, "x plain", rps("passthrough")),
        ("native throughput, OpenAI to Anthropic 1 KB", tput["translate"]["native_ratio_to_plain"],
         ">=", 0.8, "x plain", rps("translate")),
        ("native added p50, passthrough 1 KB", lat["native_added_p50_us"], "<=", 20, "us",
         f"native {lat['native']['p50_us']} / plain {lat['plain']['p50_us']} us"),
        ("native RSS growth after warm-up", growth, "<=", 1024, "KiB beyond plain's",
         f"native {mem['native']['warm_kib']} -> {mem['native']['after_kib']} KiB, plain "
         f"{mem['plain']['warm_kib']} -> {mem['plain']['after_kib']} KiB over "
         f"{mem['native']['requests_after_warmup']} requests"),
    ])


def label(target):
    return target.replace("_", " ")


def markdown(r):
    m = r["machine"]
    # The native targets this run measured, as extra columns beside the Wasm ones.
    nat = r["native"]["targets"]
    envoys = ("plain", "floor", "meshllm", *nat)
    native_bytes = f", {m['module_bytes']} bytes of native module" if "native" in nat else ""
    lines = [
        f"# meshllm benchmark, {r['date']} ({r['profile']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; {m['envoy']}; "
        f"meshllm {m['commit']} ({m['wasm_bytes']} bytes of Wasm{native_bytes}).",
        "",
        "Method:",
        *[f"- {k}: {v}" for k, v in r["method"].items()],
        "",
        "## Budget (issue 23: the Wasm build above the empty filter's floor)",
        "",
        "| item | this run | budget | met |",
        "| --- | ---: | --- | --- |",
        *[f"| {b['item']} | {b['value']} {b['unit']} | {b['limit']} | {'yes' if b['met'] else 'NO'} |"
          for b in r["budget"]],
        "",
        "## Native budget (issue 22)",
        "",
    ]
    if r["native_budget"]:
        lines += [
            "The native build (`native`), judged on the same run's plain Envoy.",
            "",
            "| item | this run | budget | met | figures |",
            "| --- | ---: | --- | --- | --- |",
            *[f"| {b['item']} | {b['value']} {b['unit']} | {b['limit']} | "
              f"{'yes' if b['met'] else 'NO'} | {b['figures']} |" for b in r["native_budget"]],
        ]
    if r["native"]["note"]:
        lines += [""] * bool(r["native_budget"]) + [f"Native targets {r['native']['note']}."]
    lines += [
        "",
        "## Latency at concurrency 1 (µs)",
        "",
        "| scenario | body | direct p50 | plain p50 | floor p50 | meshllm p50 | added p50 | plain p99 | meshllm p99 | added p99 |"
        + "".join(f" {label(t)} p50 |" for t in nat)
        + (" native added p50 | native p99 | native added p99 |" if "native" in nat else ""),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        + " ---: |" * (len(nat) + (3 if "native" in nat else 0)),
    ]
    for x in r["latency"]:
        lines.append(
            f"| {x['scenario']} | {size_name(x['body_bytes'])} | {x['direct']['p50_us']} | "
            f"{x['plain']['p50_us']} | {x['floor']['p50_us']} | {x['meshllm']['p50_us']} | "
            f"**{x['added_p50_us']}** | "
            f"{x['plain']['p99_us']} | {x['meshllm']['p99_us']} | {x['added_p99_us']} |"
            + "".join(f" {x[t]['p50_us']} |" for t in nat)
            + (f" **{x['native_added_p50_us']}** | {x['native']['p99_us']} | "
               f"{x['native_added_p99_us']} |" if "native" in nat else ""))
    lines += [
        "",
        "## Saturated throughput, one Envoy worker (requests/s, 1 KB)",
        "",
        "| scenario | direct | plain | floor | meshllm | meshllm / plain | floor / plain |"
        + "".join(f" {label(t)} | {label(t)} / plain |" for t in nat)
        + f" Envoy CPU µs per request: {' / '.join(label(t) for t in envoys)} | failed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: | ---: |" * len(nat),
    ]
    for x in r["throughput"]:
        failed = sum(x[t]["failed"] for t in envoys)
        cpu = " / ".join(str(x[t]["cpu_us_per_request"]) for t in envoys)
        lines.append(f"| {x['scenario']} | {x['direct']['rps']} | {x['plain']['rps']} | "
                     f"{x['floor']['rps']} | {x['meshllm']['rps']} | **{x['ratio_to_plain']}** | "
                     f"{x['floor_ratio_to_plain']} |"
                     + "".join(f" {x[t]['rps']} | **{x[t + '_ratio_to_plain']}** |" for t in nat)
                     + f" {cpu} | {failed} |")
    lines += [
        "",
        "## Streaming (µs)",
        "",
        "| scenario | plain TTFB p50 | meshllm TTFB p50 | added | plain event delay p50 / p99 | meshllm event delay p50 / p99 | held back |"
        + (" native TTFB p50 | native added | native event delay p50 / p99 | native held back |"
           if "native" in nat else ""),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" * 4 if "native" in nat else ""),
    ]
    for x in r["streaming"]:
        p, g = x["plain"], x["meshllm"]
        n = x.get("native")
        lines.append(
            f"| {x['scenario']} | {p['ttfb_p50_us']} | {g['ttfb_p50_us']} | **{x['added_ttfb_p50_us']}** | "
            f"{p['event_delay_p50_us']} / {p['event_delay_p99_us']} | "
            f"{g['event_delay_p50_us']} / {g['event_delay_p99_us']} | {g['held_back']} of {g['events']} |"
            + (f" {n['ttfb_p50_us']} | **{x['native_added_ttfb_p50_us']}** | "
               f"{n['event_delay_p50_us']} / {n['event_delay_p99_us']} | "
               f"{n['held_back']} of {n['events']} |" if n else ""))
    mem = r["memory"]
    lines += [
        "",
        "## Envoy memory (RSS, KiB)",
        "",
        "| envoy | at start | after warm-up | after more requests | growth |",
        "| --- | ---: | ---: | ---: | ---: |",
        *[f"| {label(n)} (+{mem[n]['requests_after_warmup']} requests) | {mem[n]['start_kib']} | "
          f"{mem[n]['warm_kib']} | {mem[n]['after_kib']} | {mem[n]['growth_kib']} |"
          for n in envoys],
        "",
        "## The shared quota store's cost (passthrough 1 KB)",
        "",
    ]
    side = r["sidecar_other"]
    rows = [(n, side[n]) for n in ("plain", "sidecar_plain", "sidecar_other")]
    lines[-2:-2] = [
        "## A sidecar's other traffic (passthrough 1 KB, not an LLM host)",
        "",
        "| target | p50 | p99 | requests/s | Envoy CPU µs per request (round-to-round spread) | failed |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {n} | {x['p50_us']} | {x['p99_us']} | {x['rps']} | {x['cpu_us_per_request']} "
          f"({x['cpu_spread_us']}) | {x['failed']} |" for n, x in rows],
        "",
        "sidecar_plain = the same routes and clusters without meshllm's filters. sidecar_other "
        f"over it: p50 {side['added_p50_us']} µs, CPU {side['added_cpu_us_per_request']} µs "
        f"per request, throughput {side['ratio']}×.",
        "",
        "## Guardrails (passthrough, every built-in rule on, nothing found)",
        "",
        "| prompt | meshllm p50 | guarded p50 | added by the guardrails |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {size} | {g['meshllm_p50_us']} | {g['guarded_p50_us']} | **{g['added_p50_us']}** |"
          for size, g in r["guardrails"].items()],
        "",
        "## A cache hit (passthrough, the same request repeated)",
        "",
        "| prompt | direct p50 | plain p50 | meshllm p50 (miss path) | cached p50 (hit) "
        "| hit vs plain |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {size} | {c['direct_p50_us']} | {c['plain_p50_us']} | {c['meshllm_p50_us']} "
          f"| {c['cached_p50_us']} | **{c['hit_vs_plain_p50_us']}** |"
          for size, c in r["cache"].items()],
        "",
        f"Hits counted by the cached Envoy: {r['cache_hits']['hit']} of "
        f"{r['cache_hits']['hit'] + r['cache_hits']['miss']} lookups.",
        "",
    ]
    store = r["store"]
    if not store["targets"]:
        lines += [store["note"], ""]
    else:
        local = store["meshllm"]
        lines += [
            store["note"] + ".",
            "",
            "| target | p50 | added p50 | p99 | added p99 | requests/s | / meshllm | "
            "Envoy CPU µs per request | added CPU µs | failed |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| meshllm (local quotas) | {local['p50_us']} | | {local['p99_us']} | | "
            f"{local['rps']} | | {local['cpu_us_per_request']} | | {local['failed']} |",
            *[f"| {n} | {x['p50_us']} | **{x['added_p50_us']}** | {x['p99_us']} | "
              f"{x['added_p99_us']} | {x['rps']} | {x['ratio_to_meshllm']} | "
              f"{x['cpu_us_per_request']} | **{x['added_cpu_us_per_request']}** | {x['failed']} |"
              for n, x in store["targets"].items()],
            "",
        ]
    return "\n".join(lines)


def size_name(n):
    return f"{n // MB} MB" if n >= MB else f"{n // KB} KB"


def main(argv=None):
    global WASM, MODULE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run that checks the harness")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--wasm", type=Path, default=WASM,
                    help="the meshllm build to measure (another commit's, for before/after)")
    ap.add_argument("--module", type=Path, default=MODULE,
                    help="the native build (libmeshllm.so) to measure; left out with a note "
                         "when missing")
    ap.add_argument("--label", default="", help="a word for the result files' names")
    args = ap.parse_args(argv)
    WASM = args.wasm.resolve()
    MODULE = args.module.resolve()
    for path, how in ((WASM, "make build"), (TOOL, "make bench-build"), (NULL_WASM, "make bench-build")):
        if not path.exists():
            raise SystemExit(f"{path} is missing: run `{how}` (or `make bench`)")
    run(Profile(args.quick), args.out, args.label)


if __name__ == "__main__":
    main()
