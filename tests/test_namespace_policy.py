"""Namespace policies through a real Envoy: allow-lists per namespace and
service, namespace aliases, namespace quota rules, and the listener-metadata
override a namespace-scoped Istio EnvoyFilter delivers, rolled out live
through a file-based LDS while Envoy keeps running.

Callers are identified as in a sidecar (`mesh_node`: the proxy's node
metadata), so each Envoy here serves one namespace; the quota test runs one
proxy for two namespaces (a trusted identity header, as behind a gateway)
to show one namespace's rules leave the other's callers alone."""

import copy
import json

import anthropic
import openai
import pytest

from conftest import KEYS, Envoy, free_port, gateway_plugin_config, http, wait_for

MESH_ALLOWED = ["gpt-4o-mini", "smart", "claude-sonnet", "gemini-flash"]
SHOP = {
    "aliases": {"house": "claude-sonnet", "cheap": "gpt-4o-mini"},
    "allowed_models": ["house", "cheap", "gemini-flash"],
    "services": {"batch": {"allowed_models": ["cheap"]}},
    "quotas": {"limits": [
        {"name": "daily", "match": {"model": "gemini-flash"}, "requests_per_day": 2},
    ]},
}


def node(namespace, app):
    return {
        "id": f"sidecar~10.0.0.9~{app}.{namespace}~{namespace}.svc.cluster.local",
        "cluster": f"{app}.{namespace}",
        "metadata": {
            "NAMESPACE": namespace,
            "WORKLOAD_NAME": f"{app}-v1",
            "LABELS": {"app": app, "service.istio.io/canonical-name": app},
        },
    }


def policy_config(identity=None, failover=True):
    cfg = gateway_plugin_config(free_port())
    cfg["identity"] = identity or {"source": "mesh_node"}
    cfg["allowed_models"] = MESH_ALLOWED
    cfg["namespaces"] = {"shop": copy.deepcopy(SHOP)}
    # A mesh rule of the same name: its bucket is not the namespace's.
    cfg["quotas"] = {"limits": [
        {"name": "daily", "match": {"namespace": "*"}, "requests_per_day": 1000},
    ]}
    if not failover:
        cfg["failover"] = {"enabled": False}
    return cfg


def start(mocks, cfg, **kw):
    upstreams = {name: ("127.0.0.1", m.port) for name, m in mocks.items()}
    env = Envoy(cfg, upstreams=upstreams, env=KEYS, **kw)
    try:
        env.wait_ready()
    except Exception:
        env.stop()
        raise
    return env


@pytest.fixture(scope="module")
def shop(wasm, mocks):
    env = start(mocks, policy_config(), node=node("shop", "chat"))
    yield env
    env.stop()


@pytest.fixture(scope="module")
def misc(wasm, mocks):
    env = start(mocks, policy_config(), node=node("misc", "app"))
    yield env
    env.stop()


def oai(env):
    return openai.OpenAI(base_url=env.url + "/v1", api_key="unused", max_retries=0)


def claude(env):
    return anthropic.Anthropic(base_url=env.url, api_key="unused", max_retries=0)


def chat(env, model):
    return oai(env).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hello"}])


def log_lines(env, count):
    assert wait_for(lambda: len(env.access_log_lines()) >= count)
    return [json.loads(x) for x in env.access_log_lines()]


def test_mesh_callers_get_the_mesh_list_and_403s_in_each_api_shape(misc):
    assert chat(misc, "gpt-4o-mini").parse().choices[0].message.content
    # Listing a model allows its aliases too.
    assert chat(misc, "mini").headers["x-meshllm-provider"] == "openai"
    with pytest.raises(openai.PermissionDeniedError) as e:
        chat(misc, "gpt-4o")
    assert e.value.status_code == 403
    assert (e.value.type, e.value.param, e.value.code) == (
        "invalid_request_error", "model", "model_not_allowed")
    assert "`gpt-4o`" in e.value.message and "misc/app" in e.value.message
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        claude(misc).messages.create(model="gpt-4o", max_tokens=10,
                                     messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "permission_error"
    status, _, raw = http("POST", misc.url + "/v1beta/models/gpt-4o:generateContent",
                          {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
    assert status == 403
    err = json.loads(raw)["error"]
    assert (err["code"], err["status"]) == (403, "PERMISSION_DENIED")
    # Another namespace's alias is just an unknown name here: 404 as before.
    with pytest.raises(openai.NotFoundError):
        chat(misc, "house")
    assert wait_for(lambda: misc.metric("meshllm_requests_total", caller_namespace="misc",
                                        gen_ai_request_model="gpt-4o", error_type="403") == 3)
    lines = log_lines(misc, 6)
    assert {x["policy"] for x in lines} == {"mesh"}
    assert [x["status"] for x in lines].count(403) == 3


def test_namespace_list_replaces_the_mesh_list(shop, mocks):
    # gpt-4o-mini through its namespace alias, its model alias and its name.
    for model in ["cheap", "mini", "gpt-4o-mini"]:
        assert chat(shop, model).headers["x-meshllm-provider"] == "openai"
    # `smart` is on the mesh list but not on shop's.
    with pytest.raises(openai.PermissionDeniedError) as e:
        chat(shop, "smart")
    assert e.value.code == "model_not_allowed"
    assert "namespace's policy" in e.value.message
    lines = log_lines(shop, 4)
    assert {x["policy"] for x in lines} == {"namespace"}


def test_a_namespace_alias_reaches_its_provider_with_and_without_failover(shop, mocks):
    reply = chat(shop, "house")
    assert reply.headers["x-meshllm-provider"] == "anthropic"
    assert reply.headers["x-meshllm-model"] == "claude-sonnet-4-5"
    sent = mocks["anthropic"].take()[-1]
    assert json.loads(sent["body"])["model"] == "claude-sonnet-4-5"
    assert wait_for(lambda: shop.metric("meshllm_requests_total", caller_namespace="shop",
                                        gen_ai_request_model="claude-sonnet") >= 1)
    # The same through the Anthropic SDK (same API: nothing translated).
    msg = claude(shop).messages.create(model="house", max_tokens=10,
                                       messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text
    env = start(mocks, policy_config(failover=False), node=node("shop", "chat"))
    try:
        reply = chat(env, "house")
        assert reply.headers["x-meshllm-provider"] == "anthropic"
        assert json.loads(mocks["anthropic"].take()[-1]["body"])["model"] == "claude-sonnet-4-5"
        with pytest.raises(openai.PermissionDeniedError):
            chat(env, "smart")
    finally:
        env.stop()


def test_model_listings_show_what_the_caller_may_use(shop, misc):
    assert [m.id for m in oai(shop).models.list()] == [
        "gpt-4o-mini", "mini", "claude-sonnet", "claude", "gemini-flash", "gemini",
        "cheap", "house"]
    assert [m.id for m in oai(misc).models.list()] == [
        "gpt-4o-mini", "mini", "claude-sonnet", "claude", "gemini-flash", "gemini", "smart"]
    house = oai(shop).models.retrieve("house")
    assert (house.id, house.owned_by) == ("house", "anthropic")
    with pytest.raises(openai.NotFoundError):
        oai(shop).models.retrieve("smart")
    assert [m.id for m in claude(shop).models.list()][-2:] == ["cheap", "house"]


def test_a_service_list_replaces_the_namespace_list(wasm, mocks):
    env = start(mocks, policy_config(), node=node("shop", "batch"))
    try:
        assert chat(env, "cheap").headers["x-meshllm-provider"] == "openai"
        with pytest.raises(openai.PermissionDeniedError):
            chat(env, "house")
        assert [m.id for m in oai(env).models.list()] == ["gpt-4o-mini", "mini", "cheap"]
    finally:
        env.stop()


def test_namespace_quota_rules_refuse_their_callers_only(wasm, mocks):
    cfg = policy_config(identity={"source": "trusted_header", "header": "x-caller"})
    env = start(mocks, cfg)
    try:
        def call(caller):
            return http("POST", env.url + "/v1/chat/completions",
                        {"model": "gemini-flash", "max_tokens": 5,
                         "messages": [{"role": "user", "content": "hi"}]},
                        {"x-caller": caller})
        assert [call("shop/chat")[0] for _ in range(3)] == [200, 200, 429]
        status, headers, raw = call("shop/other")
        assert status == 429
        assert "'shop/daily'" in json.loads(raw)["error"]["message"]
        # The mesh rule of the same name counts everyone in its own bucket.
        assert [call("team/chat")[0] for _ in range(3)] == [200, 200, 200]
        assert wait_for(lambda: env.metric("meshllm_quota_rejections_total",
                                           caller_namespace="shop", limit="shop/daily") == 2)
        assert env.metric("meshllm_quota_rejections_total", caller_namespace="team") == 0
        assert env.metric("meshllm_quota_rejections_total", limit="daily") == 0
    finally:
        env.stop()


def listener_policy(policy):
    return {"filter_metadata": {"meshllm": {"policy": json.dumps(policy)}}}


OVERRIDE = {"allowed_models": ["gpt-4o", "house"], "aliases": {"house": "gpt-4o"}}


@pytest.fixture
def rollout(wasm, mocks):
    env = start(mocks, policy_config(), node=node("shop", "chat"),
                listener_metadata=listener_policy(OVERRIDE), dynamic_listener=True)
    yield env
    env.stop()


def provider_of(env, model):
    """The provider that served `model`, or the refusal's status."""
    status, headers, raw = http("POST", env.url + "/v1/chat/completions",
                                {"model": model, "messages": [{"role": "user", "content": "x"}]})
    return headers.get("x-meshllm-provider") if status == 200 else status


def test_listener_metadata_beats_the_document_and_rolls_out_live(rollout, mocks):
    env = rollout
    pid = env.proc.pid
    # The listener's policy replaces shop's entry: its alias, its list.
    reply = chat(env, "house")
    assert reply.headers["x-meshllm-provider"] == "openai"
    assert json.loads(mocks["openai"].take()[-1]["body"])["model"] == "gpt-4o"
    with pytest.raises(openai.PermissionDeniedError):
        chat(env, "claude-sonnet")
    # The document's namespace alias is gone with the document's entry.
    with pytest.raises(openai.NotFoundError):
        chat(env, "cheap")
    assert {x["policy"] for x in log_lines(env, 3)} == {"listener"}

    # Roll out a new policy: the listener is replaced, Envoy keeps running.
    updates = env.set_listener_metadata(listener_policy(
        {"allowed_models": ["house"], "aliases": {"house": "claude-sonnet"}}))
    assert wait_for(lambda: env.stat("listener_manager.lds.update_success") >= updates)
    assert wait_for(lambda: provider_of(env, "house") == "anthropic")
    assert provider_of(env, "gpt-4o") == 403

    # An invalid policy fails closed, naming the field; logged once.
    updates = env.set_listener_metadata(listener_policy({"aliases": {"house": "gpt-5"}}))
    assert wait_for(lambda: provider_of(env, "house") == 500)
    with pytest.raises(openai.InternalServerError) as e:
        chat(env, "gpt-4o-mini")
    assert e.value.code == "invalid_namespace_policy"
    assert "meshllm.policy.aliases.house" in e.value.message
    with pytest.raises(anthropic.InternalServerError) as e:
        claude(env).messages.create(model="claude", max_tokens=5,
                                    messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["type"] == "api_error"
    assert "meshllm.policy.aliases.house" in e.value.body["error"]["message"]
    for _ in range(3):
        assert provider_of(env, "house") == 500
    assert env.log_text().count("invalid namespace policy in listener metadata") == 1

    # Without the override the document's namespace entry applies again.
    env.set_listener_metadata({})
    assert wait_for(lambda: provider_of(env, "cheap") == "openai")
    assert provider_of(env, "house") == "anthropic"
    assert wait_for(lambda: json.loads(env.access_log_lines()[-1])["policy"] == "namespace")
    assert env.proc.pid == pid and env.proc.poll() is None
