"""`make run`'s launcher: demo mode serves the example models offline, and
stopping it stops Envoy and the demo provider."""

import os
import signal
import subprocess
import sys
import time

import anthropic
import openai
from google import genai
from google.genai import types

from conftest import CREDENTIAL_VARS, ROOT, WASM, free_port, http


def test_run_serves_the_demo_and_stops_cleanly(wasm):
    port, admin = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not CREDENTIAL_VARS.search(k)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "envoy" / "tools" / "run.py"), "--port", str(port),
         "--admin-port", str(admin), "--wasm", str(WASM)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
        start_new_session=True,
    )
    try:
        banner = ""
        deadline = time.time() + 40
        while "Stop with Ctrl-C" not in banner and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            banner += line
        assert f"listening on http://127.0.0.1:{port}" in banner, banner
        assert "demo provider:  openai" in banner

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                               max_retries=0, timeout=15)
        assert "gpt-4o-mini" in [m.id for m in client.models.list()]
        resp = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
        assert resp.choices[0].message.content == "Hello from the demo provider! You said: hello"
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
            assert m.content[0].text == "Hello from the demo provider! You said: hello", model
            r = gemini.models.generate_content(model=model, contents="hello")
            assert r.text == "Hello from the demo provider! You said: hello", model
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    # Envoy and the demo provider went with it: their ports are closed.
    for p in (port, admin):
        try:
            http("GET", f"http://127.0.0.1:{p}/", timeout=1)
            assert False, f"port {p} still answers"
        except OSError:
            pass
    leftover = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "processes left behind"
