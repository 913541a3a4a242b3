"""Quota rules shared across proxies through Redis (issue 21, exact mode and leases):
a real Redis and its HTTP bridge webdis, started here on free ports, and
three Envoys (two workers each) running the filter against them. Request
limits hold exactly in total, budgets survive restarting every Envoy,
settles land, and a stopped Redis gives each rule its configured behaviour
until it returns (no restart)."""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import KEYS, Envoy, free_port, gateway_plugin_config, http, stop_process, wait_for

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = (ROOT / "src" / "quota" / "store.lua").read_text()
WEBDIS_CONFIG = ROOT / "envoy" / "webdis.json"
CALLER = "x-caller"
KEY_MARGIN_S = 120  # store.rs KEY_MARGIN_S
DAY_S = 86400

LIMITS = [
    {"name": "exact", "match": {"namespace": "exact"}, "requests_per_day": 100, "shared": True},
    {"name": "tok", "match": {"namespace": "tok"}, "tokens_per_day": 1000000, "shared": True},
    {"name": "open", "match": {"namespace": "open"}, "requests_per_day": 1000, "shared": True,
     "on_store_failure": "open"},
    {"name": "closed", "match": {"namespace": "closed"}, "requests_per_day": 1000, "shared": True},
    {"name": "after", "match": {"namespace": "after"}, "requests_per_day": 5, "shared": True},
    {"name": "local", "match": {"namespace": "local"}, "requests_per_day": 2},
    {"name": "tok-cap", "match": {"namespace": "cap"}, "tokens_per_day": 2000, "shared": True},
]

# Leases (lease.rs): P proxies share each rule, each holding at most L unused.
LEASE_P, LEASE_REQUESTS, LEASE_TOKENS = 3, 20, 1000
LEASED_MAX, LEASED_TOKENS_MAX = 600, 12000
LIMITS += [
    {"name": "leased", "match": {"namespace": "leased"}, "requests_per_day": LEASED_MAX,
     "shared": True, "lease": {"proxies": LEASE_P, "requests": LEASE_REQUESTS}},
    {"name": "leased-tok", "match": {"namespace": "ltok"}, "tokens_per_day": LEASED_TOKENS_MAX,
     "shared": True, "lease": {"proxies": LEASE_P, "tokens": LEASE_TOKENS}},
    {"name": "leased-open", "match": {"namespace": "lopen"}, "requests_per_day": 1000,
     "shared": True, "on_store_failure": "open", "lease": {"proxies": LEASE_P}},
    {"name": "leased-closed", "match": {"namespace": "lclosed"}, "requests_per_day": 1000,
     "shared": True, "lease": {"proxies": LEASE_P}},
]
IDLE_RETURN_S = 5 + 1  # lease.rs IDLE_MS, checked every IDLE_CHECK_MS


def need(binary):
    if not shutil.which(binary):
        pytest.fail(f"{binary} is missing: `make deps` installs it (Debian package)")


# The ACL envoy/README.md recommends: the user webdis connects as (here
# `default`) reaches only the gateway's keys with the script's commands;
# the test reads Redis as an admin.
GATEWAY_ACL = ["default", "on", "nopass", "~meshllm/quota/*", "~meshllm/cache/*", "-@all",
               "+eval", "+evalsha", "+get", "+incrby", "+set", "+exists", "+expireat",
               "+append", "+rename"]
ADMIN_PASSWORD = "test-admin"


class Redis:
    """redis-server without persistence, on a free port, stopped by PID."""

    def __init__(self, port=None):
        need("redis-server")
        self.port = port or free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--user", *GATEWAY_ACL,
             "--user", "admin", "on", f">{ADMIN_PASSWORD}", "~*", "+@all"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for(lambda: self.cli("PING") == "PONG", timeout=10), "redis did not start"

    def cli(self, *args):
        out = subprocess.run(["redis-cli", "-p", str(self.port), "--user", "admin",
                              "--pass", ADMIN_PASSWORD, "--no-auth-warning", *args],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)


class Webdis:
    """The bridge, with the shipped config pointed at our Redis and port."""

    def __init__(self, redis_port):
        need("webdis")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="meshllm-webdis-")
        cfg = json.loads(WEBDIS_CONFIG.read_text())
        cfg.update({"redis_port": redis_port, "http_port": self.port, "daemonize": False,
                    "logfile": os.path.join(self.dir, "webdis.log")})
        cfg.pop("pidfile", None)
        path = os.path.join(self.dir, "webdis.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        self.proc = subprocess.Popen(["webdis", path], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        assert wait_for(lambda: self.call("EVAL", "return 1", "0") == (200, b'{"EVAL":1}'),
                        timeout=10)

    def call(self, *args):
        # As the filter calls it: a GET with the command as its path (webdis
        # 0.1.9 hangs on a POST body sent apart from its headers).
        path = "/".join(urllib.parse.quote(a, safe="").replace(".", "%2E") for a in args)
        try:
            status, _, out = http("GET", f"http://127.0.0.1:{self.port}/{path}", timeout=3)
        except OSError:
            return 0, b""
        return status, out

    def stop(self):
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def config(dead_port, timeout_ms=300):
    cfg = gateway_plugin_config(dead_port)
    cfg["identity"] = {"source": "trusted_header", "header": CALLER}
    cfg["quotas"] = {
        "store": {"cluster": "quota_store", "timeout_ms": timeout_ms, "on_failure": "closed"},
        "limits": LIMITS,
    }
    return cfg


def start_envoys(mocks, cfg, webdis_port, n=3):
    upstreams = {name: ("127.0.0.1", m.port) for name, m in mocks.items()}
    upstreams["quota_store"] = ("127.0.0.1", webdis_port)
    envs = [Envoy(cfg, upstreams=upstreams, env=KEYS, concurrency=2) for _ in range(n)]
    try:
        for e in envs:
            e.wait_ready()
    except Exception:
        for e in envs:
            e.stop()
        raise
    return envs


@pytest.fixture(scope="module")
def stack(wasm, mocks):
    redis = Redis()
    webdis = Webdis(redis.port)
    cfg = config(free_port())
    state = {"redis": redis, "webdis": webdis, "cfg": cfg, "mocks": mocks}
    try:
        state["envoys"] = start_envoys(mocks, cfg, webdis.port)
        yield state
    finally:
        for e in state.get("envoys", []):
            e.stop()
        webdis.stop()
        state["redis"].stop()


def chat(env, caller, model="gpt-4o"):
    return http("POST", env.url + "/v1/chat/completions",
                {"model": model, "messages": [{"role": "user", "content": "hello there"}],
                 "max_tokens": 16},
                {CALLER: caller})


def day_key(rule, meter):
    return f"meshllm/quota/v1/{rule}#{meter}:day:{int(time.time()) // DAY_S}"


# --- the script, through the bridge ---------------------------------------

def test_script_reserves_all_or_nothing_and_settles(stack):
    webdis, redis = stack["webdis"], stack["redis"]
    far = str(int(time.time()) + 3600)
    a, b = "meshllm/quota/v1/t-script#a", "meshllm/quota/v1/t-script#b"

    def reserve(amount_a, amount_b):
        status, body = webdis.call("EVAL", SCRIPT, "2", a, b, "reserve",
                                   "10", str(amount_a), far, "5", str(amount_b), far)
        assert status == 200, body
        return json.loads(body)["EVAL"]

    assert reserve(6, 2) == [1, 6, 2]
    # b would pass its max: nothing is added to either.
    assert reserve(1, 4) == [0, 6, 2]
    assert redis.cli("GET", a) == "6" and redis.cli("GET", b) == "2"
    # A zero amount passes even on a spent counter.
    assert reserve(4, 0) == [1, 10, 2]
    assert int(redis.cli("TTL", a)) > 3500
    # Settle: refunds, never below 0, a gone counter is not revived.
    gone = "meshllm/quota/v1/t-script#gone"
    status, body = webdis.call("EVAL", SCRIPT, "3", a, b, gone, "settle", "-3", "-9", "5")
    assert status == 200 and json.loads(body)["EVAL"] == [1, 7, 0, -1]
    assert redis.cli("EXISTS", gone) == "0"
    assert int(redis.cli("TTL", a)) > 3500, "a settle keeps the expiry"


def test_bridge_runs_only_the_gateways_commands(stack):
    status, _ = stack["webdis"].call("FLUSHALL")
    assert status == 403
    for command in (("KEYS", "*"), ("DEL", "meshllm/quota/v1/x"), ("CONFIG", "GET", "*")):
        status, _ = stack["webdis"].call(*command)
        assert status == 403, command
    # The response cache's commands pass the bridge, and Redis's ACL keeps
    # them to the gateway's keys.
    stack["redis"].cli("SET", "other", "1")
    for command in (("GET", "other"), ("SET", "other", "2"), ("APPEND", "other", "x"),
                    ("RENAME", "meshllm/cache/a", "other")):
        status, body = stack["webdis"].call(*command)
        assert status == 200 and b"[false," in body, (command, body)
    assert stack["redis"].cli("GET", "other") == "1"
    stack["redis"].cli("DEL", "other")
    # EVAL runs scripts, but Redis's ACL keeps them to the gateway's keys
    # and commands.
    for script in ("return redis.call('FLUSHALL')", "return redis.call('SET', 'other', '1')"):
        status, body = stack["webdis"].call("EVAL", script, "0")
        assert status == 200 and b'[false,' in body, body
    assert stack["redis"].cli("EXISTS", "other") == "0"


# --- through Envoy ----------------------------------------------------------

def test_request_limit_is_exact_across_three_proxies(stack):
    envs = stack["envoys"]
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda i: chat(envs[i % 3], f"exact/svc{i % 7}"), range(300)))
    statuses = [s for s, _, _ in results]
    assert statuses.count(200) == 100, {s: statuses.count(s) for s in set(statuses)}
    assert statuses.count(429) == 200
    assert stack["redis"].cli("GET", day_key("exact", "requests")) == "100"
    status, headers, body = next(r for r in results if r[0] == 429)
    err = json.loads(body)["error"]
    assert err["code"] == "rate_limit_exceeded" and "'exact'" in err["message"]
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-limit-requests"] == "100"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    ok_headers = next(r for r in results if r[0] == 200)[1]
    assert ok_headers["x-ratelimit-limit-requests"] == "100"
    # The key expires within the documented margin after its window.
    ttl = int(stack["redis"].cli("TTL", day_key("exact", "requests")))
    left = DAY_S - int(time.time()) % DAY_S
    assert 0 < ttl <= left + KEY_MARGIN_S + 1
    calls = sum(e.metric("meshllm_quota_store_calls_total", kind="reserve", outcome="ok")
                for e in envs)
    refused = sum(e.metric("meshllm_quota_store_calls_total", kind="reserve", outcome="refused")
                  for e in envs)
    assert calls == 100 and refused == 200
    # The admin view: each proxy's gauge of the shared bucket follows the
    # store's answers (concurrent answers may land out of order, so one
    # more refusal each settles it).
    for e in envs:
        assert chat(e, "exact/again")[0] == 429
    used = [e.metric("meshllm_budget_used_percent", limit="exact", kind="requests_per_day")
            for e in envs]
    assert used == [100, 100, 100], used


def test_settles_land_with_the_real_usage(stack):
    envs = stack["envoys"]
    used = 0
    for i in range(9):
        status, _, body = chat(envs[i % 3], "tok/a")
        assert status == 200
        used += json.loads(body)["usage"]["total_tokens"]
    key = day_key("tok", "tokens")
    assert wait_for(lambda: stack["redis"].cli("GET", key) == str(used), timeout=10), \
        (stack["redis"].cli("GET", key), used)
    assert wait_for(lambda: sum(e.metric("meshllm_quota_store_calls_total", kind="settle",
                                         outcome="ok") for e in envs) >= 9)


def test_token_limit_holds_across_proxies(stack):
    """Each request reserves its estimate (prompt bytes / 4 + max_tokens)
    and settles what it used: concurrent requests on three proxies never
    jointly pass the limit, and what Redis holds is what was used."""
    envs = stack["envoys"]
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda i: chat(envs[i % 3], "cap/a"), range(200)))
    ok = [json.loads(b)["usage"]["total_tokens"] for s, _, b in results if s == 200]
    assert ok and len(ok) < 200
    assert all(s in (200, 429) for s, _, _ in results)
    key = day_key("tok-cap", "tokens")
    assert wait_for(lambda: stack["redis"].cli("GET", key) == str(sum(ok)), timeout=10), \
        (stack["redis"].cli("GET", key), sum(ok))
    assert sum(ok) <= 2000


def store_calls(envs, **labels):
    return sum(e.metric("meshllm_quota_store_calls_total", **labels) for e in envs)


def test_leased_request_limit_holds_with_few_round_trips(stack):
    """Three proxies lease slices of a shared request limit: below the limit
    less the capacity leases can strand (P x L) every request is admitted,
    most without a store call; past it, never more than the limit in total,
    and at most P x L refused while the store had room. Idle leases go back,
    so the store ends holding exactly what was admitted."""
    envs, redis = stack["envoys"], stack["redis"]
    bound = LEASE_P * LEASE_REQUESTS
    before_calls = store_calls(envs)
    before_leased = sum(e.metric("meshllm_quota_lease_admissions_total") for e in envs)
    first_n = LEASED_MAX - bound
    with ThreadPoolExecutor(64) as pool:
        first = list(pool.map(lambda i: chat(envs[i % 3], f"leased/svc{i % 7}")[0],
                              range(first_n)))
    assert first.count(200) == first_n, {s: first.count(s) for s in set(first)}
    time.sleep(0.5)  # detached refills land
    trips = store_calls(envs) - before_calls
    from_lease = sum(e.metric("meshllm_quota_lease_admissions_total") for e in envs) - before_leased
    print(f"MEASURED leased requests: {first_n} admitted, {trips} store round trips, "
          f"{from_lease} admitted from leases")
    assert from_lease + trips >= first_n
    assert trips * 3 <= first_n, (trips, first_n)

    with ThreadPoolExecutor(64) as pool:
        second = list(pool.map(lambda i: chat(envs[i % 3], f"leased/svc{i % 7}"), range(2 * bound)))
    statuses = [s for s, _, _ in second]
    assert statuses.count(200) + statuses.count(429) == 2 * bound, statuses
    admitted = first_n + statuses.count(200)
    key = day_key("leased", "requests")
    counter = int(redis.cli("GET", key))
    stranded = LEASED_MAX - admitted
    print(f"MEASURED leased requests: {admitted} of {LEASED_MAX} admitted, "
          f"{stranded} stranded (bound {bound}), store counter {counter} before returns")
    assert admitted <= LEASED_MAX, "request limits are exact with leases"
    assert stranded <= bound
    assert admitted <= counter <= LEASED_MAX
    status, headers, body = next(r for r in second if r[0] == 429)
    err = json.loads(body)["error"]
    assert err["code"] == "rate_limit_exceeded" and "'leased'" in err["message"], err
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-limit-requests"] == str(LEASED_MAX)
    # Idle leases go back: the store then counts exactly what was admitted.
    assert wait_for(lambda: int(redis.cli("GET", key)) == admitted,
                    timeout=IDLE_RETURN_S + 10), (redis.cli("GET", key), admitted)
    returned = sum(e.metric("meshllm_quota_lease_units_total", kind="requests",
                            outcome="returned") for e in envs)
    assert returned >= counter - admitted, (returned, counter, admitted)
    print(f"MEASURED leased requests: {returned} units returned by idle leases")


def test_leased_token_limit_overshoot_and_stranding_are_bounded(stack):
    """Token leases: requests reserve their estimate from the lease and
    settle their real usage there; usage past a lease reaches the store in
    batches of at most L/2 per proxy. What was admitted never passes the
    limit by more than P x L/2 plus the estimate shortfalls, and what the
    store ends with (after idle returns) is exactly the usage."""
    envs, redis = stack["envoys"], stack["redis"]
    before_calls = store_calls(envs)
    n = 1800
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda i: chat(envs[i % 3], "ltok/a"), range(n)))
    ok = [json.loads(b)["usage"]["total_tokens"] for s, _, b in results if s == 200]
    statuses = [s for s, _, _ in results]
    assert statuses.count(200) + statuses.count(429) == n
    assert statuses.count(429) > 0, "the run passes the limit"
    used = sum(ok)
    trips = store_calls(envs) - before_calls
    overshoot = used - LEASED_TOKENS_MAX
    # The largest estimate: prompt bytes / 4 + max_tokens (16).
    estimate = len(json.dumps({"model": "gpt-4o", "messages": [
        {"role": "user", "content": "hello there"}], "max_tokens": 16})) // 4 + 16
    stranded = LEASED_TOKENS_MAX - used
    print(f"MEASURED leased tokens: {len(ok)} admitted using {used} of {LEASED_TOKENS_MAX} "
          f"(overshoot {overshoot}, stranded {stranded}), {trips} store round trips for {n} "
          f"requests, estimate {estimate}")
    assert overshoot <= LEASE_P * LEASE_TOKENS // 2
    # Stranded: leases (P x L) plus the estimates of requests in flight.
    assert stranded <= LEASE_P * LEASE_TOKENS + 64 * estimate
    # Past the limit a proxy refuses by itself for a second after the store
    # refused it (FULL_HOLD_MS), so refusals cost few calls too.
    assert trips * 3 <= n, trips
    key = day_key("leased-tok", "tokens")
    assert wait_for(lambda: int(redis.cli("GET", key)) == used,
                    timeout=IDLE_RETURN_S + 10), (redis.cli("GET", key), used)


def test_local_rules_stay_local_and_make_no_store_call(stack):
    env = stack["envoys"][0]
    before = env.metric("meshllm_quota_store_calls_total")
    assert [chat(env, "local/a")[0] for _ in range(3)] == [200, 200, 429]
    assert chat(stack["envoys"][1], "local/a")[0] == 200, "each proxy counts its own"
    assert env.metric("meshllm_quota_store_calls_total") == before


def test_budget_survives_restarting_every_envoy(stack):
    for e in stack["envoys"]:
        e.stop()
    stack["envoys"] = []
    stack["envoys"] = start_envoys(stack["mocks"], stack["cfg"], stack["webdis"].port)
    for e in stack["envoys"]:
        assert chat(e, "exact/late")[0] == 429


def test_store_down_then_back(stack):
    envs, redis = stack["envoys"], stack["redis"]
    port = redis.port
    redis.stop()
    # Open: admitted on local limits, counted.
    assert [chat(envs[i % 3], "open/a")[0] for i in range(3)] == [200, 200, 200]
    opened = sum(e.metric("meshllm_quota_store_calls_total", kind="reserve", outcome="fail_open")
                 for e in envs)
    assert opened >= 3
    # Closed: the caller's 503 with Retry-After.
    status, headers, body = chat(envs[0], "closed/a")
    assert status == 503, body
    err = json.loads(body)["error"]
    assert err["code"] == "quota_store_unavailable" and "'closed'" in err["message"]
    assert int(headers["retry-after"]) >= 1
    status, headers, body = http(
        "POST", envs[1].url + "/v1/messages",
        {"model": "claude-sonnet", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
        {CALLER: "closed/a", "anthropic-version": "2023-06-01"})
    assert status == 503 and json.loads(body)["type"] == "error", body
    assert headers["retry-after"]
    assert envs[0].metric("meshllm_quota_store_calls_total", kind="reserve",
                          outcome="fail_closed") >= 1
    # Leased rules with an empty lease ask the store, and fail the same way.
    assert [chat(envs[i % 3], "lopen/a")[0] for i in range(3)] == [200, 200, 200]
    assert store_calls(envs, kind="lease", outcome="fail_open") >= 3
    status, headers, body = chat(envs[2], "lclosed/a")
    assert status == 503, body
    assert json.loads(body)["error"]["code"] == "quota_store_unavailable"
    assert int(headers["retry-after"]) >= 1
    # Redis returns (empty: it keeps nothing): limiting resumes, no restart.
    stack["redis"] = Redis(port)
    # Each webdis thread reconnects to Redis on its own: wait until they all
    # have, then until every proxy admits again.
    webdis = stack["webdis"]
    assert wait_for(lambda: all(webdis.call("EVAL", "return 1", "0")[0] == 200
                                for _ in range(8)), timeout=15)
    for e in envs:
        assert wait_for(lambda: chat(e, "closed/a")[0] == 200, timeout=15)
    statuses = [chat(envs[i % 3], "after/a")[0] for i in range(8)]
    assert statuses.count(200) == 5 and statuses.count(429) == 3, statuses
