"""The benchmark harness runs end to end and writes what it promises.

Only the harness is checked here (a short `--quick` run): timings are
measured by `make bench` and recorded in bench/README.md, never asserted in
tests."""

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.wasm_only(
    "bench/bench.py measures the Wasm build against the empty Wasm filter")

TARGETS = ("direct", "plain", "floor", "meshllm")

# The native build's targets: the empty dynamic module (make bench-build) and
# the gateway's module (target/native/libmeshllm.so), each where it is built.
BENCH_SPEC = importlib.util.spec_from_file_location("bench", ROOT / "bench" / "bench.py")
bench = importlib.util.module_from_spec(BENCH_SPEC)
BENCH_SPEC.loader.exec_module(bench)
NATIVE_BUILT = [t for t, path in (("native_floor", bench.NATIVE_FLOOR), ("native", bench.MODULE))
                if path.exists()]


def test_quick_run_writes_json_and_markdown(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [result_json] = tmp_path.glob("*-quick.json")
    [result_md] = tmp_path.glob("*-quick.md")
    r = json.loads(result_json.read_text())

    assert r["profile"] == "quick" and r["date"]
    assert r["machine"]["cores"] >= 1 and "1.40" in r["machine"]["envoy"]
    assert r["machine"]["wasm_bytes"] > 0
    assert {"envoy", "targets", "latency", "throughput", "streaming", "memory"} <= set(r["method"])

    # Every scenario, every body size, every target, all answered 200.
    assert {(x["scenario"], x["body_bytes"]) for x in r["latency"]} == {
        (kind, size) for kind in ("passthrough", "translate")
        for size in (1024, 100 * 1024, 1024 * 1024)
    }
    for row in r["latency"]:
        for t in TARGETS:
            assert row[t]["p50_us"] > 0 and row[t]["p99_us"] >= row[t]["p50_us"]
    for row in r["throughput"]:
        for t in TARGETS:
            assert row[t]["rps"] > 0 and row[t]["failed"] == 0
        for t in ("plain", "floor", "meshllm"):
            assert row[t]["cpu_us_per_request"] > 0
    for row in r["streaming"]:
        for t in TARGETS:
            # The mock stamps every content event; all of them arrived.
            assert row[t]["events"] > 0
        assert row["meshllm"]["events"] == row["plain"]["events"]
    for name in ("plain", "floor", "meshllm"):
        mem = r["memory"][name]
        assert mem["failed"] == 0 and mem["after_kib"] > 0 and mem["requests_after_warmup"] > 0

    assert [b["item"] for b in r["budget"]][:2] == [
        "Envoy CPU per request above the floor, passthrough 1 KB",
        "Envoy CPU per request above the floor, OpenAI to Anthropic 1 KB"]
    # A pod's other traffic through a sidecar with meshllm: measured beside
    # plain, every request answered (by the mock, not the gateway).
    side = r["sidecar_other"]
    for t in ("sidecar_other", "sidecar_plain"):
        assert side[t]["failed"] == 0 and side[t]["rps"] > 0 and side[t]["cpu_us_per_request"] > 0
    assert side["noise_cpu_us"] >= 1
    # The guardrails' cost at two prompt sizes, the guarded target answering.
    assert set(r["guardrails"]) == {"1 KB", "100 KB"}
    for size in (1024, 100 * 1024):
        row = next(x for x in r["latency"] if x["scenario"] == "passthrough"
                   and x["body_bytes"] == size)
        assert row["guarded"]["p50_us"] > 0
    # A cache hit at two prompt sizes: the cached target answered every
    # repeat itself (one miss per prompt size, the rest hits).
    assert set(r["cache"]) == {"1 KB", "100 KB"}
    assert r["cache_hits"]["miss"] == 2 and r["cache_hits"]["hit"] > 10
    text = result_md.read_text()
    for heading in ("## Budget", "## Latency at concurrency 1", "## Saturated throughput",
                    "## Streaming", "## Envoy memory", "## A sidecar's other traffic",
                    "## Guardrails", "## A cache hit"):
        assert heading in text
    assert r["machine"]["commit"] in text

    # The shared store's targets, where redis-server and webdis are installed.
    assert "## The shared quota store's cost" in text
    if shutil.which("redis-server") and shutil.which("webdis"):
        [lat] = [x for x in r["latency"] if (x["scenario"], x["body_bytes"]) == ("passthrough", 1024)]
        [tput] = [x for x in r["throughput"] if x["scenario"] == "passthrough"]
        assert set(r["store"]["targets"]) == {"shared", "leased"}
        for t in ("shared", "leased"):
            assert lat[t]["p50_us"] > 0 and lat[t]["p99_us"] >= lat[t]["p50_us"]
            # The store fails closed: a request it did not answer would fail.
            assert tput[t]["rps"] > 0 and tput[t]["failed"] == 0
            assert tput[t]["cpu_us_per_request"] > 0
            x = r["store"]["targets"][t]
            assert x["added_p50_us"] == round(x["p50_us"] - lat["meshllm"]["p50_us"], 1)
            assert f"| {t} |" in text
    else:
        assert r["store"]["targets"] == {} and "not on PATH" in r["store"]["note"]

    # The native targets join every scenario beside the Wasm ones, or are left
    # out with a note when their module is not built.
    native = r["native"]["targets"]
    assert native == NATIVE_BUILT
    for row in r["latency"]:
        for t in native:
            assert row[t]["p50_us"] > 0 and row[t]["p99_us"] >= row[t]["p50_us"]
    for row in r["throughput"]:
        for t in native:
            assert row[t]["rps"] > 0 and row[t]["failed"] == 0
            assert row[t]["cpu_us_per_request"] > 0
            assert row[f"{t}_ratio_to_plain"] == round(row[t]["rps"] / row["plain"]["rps"], 3)
    for row in r["streaming"]:
        for t in native:
            assert row[t]["events"] == row["plain"]["events"]
    for t in native:
        mem = r["memory"][t]
        assert mem["failed"] == 0 and mem["after_kib"] > 0 and mem["requests_after_warmup"] > 0
        assert f"| {t.replace('_', ' ')} (+" in text
    assert "## Native budget (issue 22)" in text
    if "native" in native:
        assert [b["item"] for b in r["native_budget"]] == [
            "native throughput, passthrough 1 KB", "native throughput, OpenAI to Anthropic 1 KB",
            "native added p50, passthrough 1 KB", "native RSS growth after warm-up"]
        for b in r["native_budget"]:
            assert isinstance(b["met"], bool) and b["figures"]
            assert f"| {b['item']} | {b['value']} {b['unit']} |" in text
        assert r["machine"]["module_bytes"] > 0
    else:
        assert r["native_budget"] == []
    if len(native) < 2:
        assert "not measured" in r["native"]["note"] and r["native"]["note"] in text
    else:
        assert r["native"]["note"] is None


def test_a_missing_native_module_leaves_its_target_out_with_a_note(tmp_path):
    built = tmp_path / "libbuilt.so"
    built.write_bytes(b"")
    targets, note = bench.native_availability(tmp_path / "libmissing.so", built)
    assert targets == ["native_floor"]
    assert note.startswith("not measured: native (") and "libmissing.so is missing" in note
    assert bench.native_availability(built, built) == (["native_floor", "native"], None)


@pytest.mark.parametrize("mode", [[], ["--stream", "--streams", "3"]], ids=["load", "stream"])
def test_ab_runs_two_builds_side_by_side(mode):
    """bench/ab.py (a change's A/B): every target answers, each build gets
    its row. The same build twice, one short round."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ab.py"), "--variant", f"again={bench.WASM}",
         "--rounds", "1", "--seconds", "0.3", *mode],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for scenario in ("passthrough", "translate"):
        assert scenario in out.stdout
    rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("| ")]
    targets = [r[1].strip() for r in rows if r[1].strip() not in ("target", "---")]
    assert targets == ["plain", "floor", "base", "again"] * 2
    for r in rows:
        if r[1].strip() in ("plain", "floor", "base", "again"):
            # CPU per request or TTFB, then (load) no failed request.
            assert float(r[2]) > 0
            if not mode:
                assert r[6].strip() == "0"
