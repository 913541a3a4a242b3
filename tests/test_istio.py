"""The Istio install (k8s/base, k8s/overlays): the manifests are generated
from k8s/policy/mesh.json and current, the plugin configuration they carry is
the policy the tests run, and, put together the way istiod and istio-agent
would (tests/istio_sim.py), they run in a real Envoy with the built module."""

import json
import os
import sys

import pytest
import yaml

from conftest import ROOT

sys.path.insert(0, str(ROOT / "k8s" / "tools"))
import manifests  # noqa: E402

OVERLAYS = {
    "sidecar": ("overlays/sidecar/envoyfilter.yaml", "SIDECAR_OUTBOUND"),
    "egress-gateway": ("overlays/egress-gateway/gateway.yaml", "GATEWAY"),
}


def load(rel):
    with open(ROOT / "k8s" / rel) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def envoy_filter(mode):
    rel, _ = OVERLAYS[mode]
    (ef,) = [d for d in load(rel) if d["kind"] == "EnvoyFilter"]
    return ef


def plugin_configs(mode):
    """The plugin configurations the manifests carry, by extension name."""
    out = {}
    for p in envoy_filter(mode)["spec"]["configPatches"]:
        if p["applyTo"] == "EXTENSION_CONFIG":
            value = p["patch"]["value"]
            conf = value["typed_config"]["config"]["configuration"]["value"]
            out[value["name"]] = json.loads(conf)
    return out


def test_manifests_are_current():
    stale = []
    for rel, text in manifests.files(manifests.load_policy()).items():
        path = ROOT / "k8s" / rel
        if not path.exists() or path.read_text() != text:
            stale.append(rel)
    assert not stale, f"run `make k8s`: {stale} differ from k8s/policy/mesh.json"


@pytest.mark.parametrize("mode", OVERLAYS)
def test_both_halves_carry_the_mesh_policy(mode):
    policy = manifests.load_policy()
    configs = plugin_configs(mode)
    assert set(configs) == {"meshllm", "meshllm.upstream"}
    for conf in configs.values():
        # The mesh policy, plus only what the mode sets.
        assert {k: v for k, v in conf.items() if k not in ("identity", "hosts")} == policy
        assert conf["identity"]["source"] == ("mesh_node" if mode == "sidecar" else "mesh_peer")
        assert "api.openai.com" in conf["hosts"] and manifests.ALIAS_HOST in conf["hosts"]


@pytest.mark.parametrize("mode", OVERLAYS)
def test_listener_half_is_configured_for_body_rewrites_and_keys(mode):
    for p in envoy_filter(mode)["spec"]["configPatches"]:
        if p["applyTo"] != "EXTENSION_CONFIG":
            continue
        config = p["patch"]["value"]["typed_config"]["config"]
        # What Istio's WasmPlugin cannot set, hence the EnvoyFilter.
        assert config["allow_on_headers_stop_iteration"] is True
        assert config["fail_open"] is False
        vm = config["vm_config"]
        assert vm["code"]["remote"]["http_uri"]["uri"].startswith(("oci://", "https://"))
        # Keys come from the proxy's environment, never from the config.
        assert vm["environment_variables"]["host_env_keys"] == [
            "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"]
        assert "sk-" not in json.dumps(config)


def test_gateway_keys_come_from_a_secret_in_the_gateway_namespace():
    (dep,) = [d for d in load("overlays/egress-gateway/gateway.yaml") if d["kind"] == "Deployment"]
    (proxy,) = dep["spec"]["template"]["spec"]["containers"]
    assert proxy["name"] == "istio-proxy"
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in proxy["env"]}
    assert set(refs) == {"OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"}
    assert {r["name"] for r in refs.values()} == {manifests.KEYS_SECRET}
    assert dep["metadata"]["namespace"] == manifests.NAMESPACE


def test_module_url_and_digest_reach_both_halves(tmp_path):
    url, digest = "oci://registry.test/meshllm:1.2.3", "sha256:" + "ab" * 32
    manifests.main(["--module-url", url, "--sha256", digest, "--out-dir", str(tmp_path)])
    for rel, _ in OVERLAYS.values():
        docs = list(yaml.safe_load_all((tmp_path / rel).read_text()))
        remotes = [
            p["patch"]["value"]["typed_config"]["config"]["vm_config"]["code"]["remote"]
            for d in docs if d and d["kind"] == "EnvoyFilter"
            for p in d["spec"]["configPatches"] if p["applyTo"] == "EXTENSION_CONFIG"
        ]
        assert len(remotes) == 2
        assert all(r["http_uri"]["uri"] == url and r["sha256"] == digest for r in remotes)


def test_namespace_policy_rides_on_the_listener(tmp_path, capsys):
    policy = {"allowed_models": ["gpt-4o-mini"]}
    path = tmp_path / "shop.json"
    path.write_text(json.dumps(policy))
    manifests.main(["namespace-policy", "--namespace", "shop", str(path)])
    (ef,) = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert ef["metadata"] == {"name": "meshllm-policy", "namespace": "shop"}
    (patch,) = ef["spec"]["configPatches"]
    assert patch["applyTo"] == "LISTENER" and patch["patch"]["operation"] == "MERGE"
    assert patch["match"]["context"] == "SIDECAR_OUTBOUND"
    carried = patch["patch"]["value"]["metadata"]["filter_metadata"]["meshllm"]["policy"]
    assert json.loads(carried) == policy


def test_mode_policy_refuses_a_conflicting_identity():
    policy = manifests.load_policy()
    policy["identity"] = {"source": "trusted_header", "header": "x-caller"}
    with pytest.raises(SystemExit, match="mesh_node"):
        manifests.mode_policy(policy, "sidecar")
    assert os.path.exists(manifests.MESH_POLICY)
