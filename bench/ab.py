#!/usr/bin/env python3
"""A/B of Wasm builds in one process set: Envoy's CPU per request for each
build beside plain Envoy and the empty-filter floor, rounds interleaved so a
slow moment of the machine falls on all of them.

    .venv/bin/python bench/ab.py --variant candidate=/tmp/b.wasm [--variant ...]

The current build (target/.../meshllm.wasm, or --base) is `base`. Each
target serves 16 closed-loop connections for --seconds, --rounds times per
scenario (passthrough and OpenAI -> Anthropic, 1 KB); the table shows the
median CPU per request, its spread (min-max over rounds) and requests/s.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import render  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=PATH",
                    help="another meshllm.wasm to measure beside the base")
    ap.add_argument("--base", type=Path, default=bench.WASM)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--scenario", choices=("passthrough", "translate"), action="append")
    ap.add_argument("--stream", action="store_true",
                    help="measure streams (TTFB and per-event delay, --streams streams of 20 "
                         "events per round) instead of CPU under load")
    ap.add_argument("--streams", type=int, default=60)
    args = ap.parse_args(argv)
    variants = {"base": args.base}
    for v in args.variant:
        name, _, path = v.partition("=")
        variants[name] = Path(path)
    scenarios = args.scenario or ["passthrough", "translate"]
    models = {"passthrough": "mini", "translate": "claude"}

    envoy_cpu, client_cpus = bench.cpu_sets()
    work = tempfile.mkdtemp(prefix="meshllm-ab-")
    procs = []
    try:
        mock = bench.Proc([str(bench.TOOL), "mock"], os.path.join(work, "mock.log"),
                          cpus=client_cpus, capture_stdout=True)
        procs.append(mock)
        mock_port = int(mock.proc.stdout.readline())
        upstreams = {"openai": ("127.0.0.1", mock_port), "anthropic": ("127.0.0.1", mock_port)}

        def bootstrap(wasm):
            return render.render(bench.PLUGIN_CONFIG, wasm=str(wasm), port=bench.free_port(),
                                 admin_port=bench.free_port(), upstreams=upstreams,
                                 node=bench.NODE)

        envoys = {
            "plain": bench.Envoy("plain", bench.plain_bootstrap(bootstrap(args.base), mock_port),
                                 work, envoy_cpu, {}),
            "floor": bench.Envoy("floor", bench.floor_bootstrap(bootstrap(args.base), mock_port),
                                 work, envoy_cpu, {}),
        }
        for name, wasm in variants.items():
            envoys[name] = bench.Envoy(name, bootstrap(wasm), work, envoy_cpu, bench.KEYS)
        procs.extend(envoys.values())
        for e in envoys.values():
            e.wait_ready()
        profile = bench.Profile(quick=False)
        profile.rounds = args.rounds
        runner = bench.Bench(profile, client_cpus)

        for scenario in scenarios:
            if args.stream:
                stream_rounds(args, runner, profile, envoys, scenario, models[scenario])
                continue

            def load(t, addr):
                envoy = envoys[t]
                before = envoy.cpu_seconds()
                r = runner.tool("load", addr, models[scenario], bench.KB,
                                connections=profile.connections, seconds=args.seconds)
                r["cpu"] = 1e6 * (envoy.cpu_seconds() - before) / max(r["ok"], 1)
                return r

            rounds = bench.interleaved(profile, {t: e.addr for t, e in envoys.items()}, load)
            floor = statistics.median(r["cpu"] for r in rounds["floor"])
            print(f"\n{scenario} 1 KB, {args.rounds} rounds of {args.seconds} s")
            print("| target | CPU µs/request | min-max | over floor | requests/s | failed |")
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            for t, rs in rounds.items():
                cpus = [r["cpu"] for r in rs]
                med = statistics.median(cpus)
                print(f"| {t} | {med:.1f} | {min(cpus):.1f}-{max(cpus):.1f} | "
                      f"{med - floor:+.1f} | {statistics.median(r['rps'] for r in rs):.0f} | "
                      f"{sum(r['failed'] for r in rs)} |")
            sys.stdout.flush()
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(work, ignore_errors=True)


def stream_rounds(args, runner, profile, envoys, scenario, model):
    """Streams through every target, rounds interleaved: TTFB and the
    delay of each event after the first (p50 per round, median of rounds)."""
    rounds = bench.interleaved(profile, {t: e.addr for t, e in envoys.items()}, lambda t, addr:
                               runner.tool("stream", addr, model, bench.KB,
                                           requests=args.streams,
                                           warmup=max(1, args.streams // 10), events=20,
                                           gap_us=1000))
    print(f"\n{scenario} streams, {args.rounds} rounds of {args.streams} streams of 20 events")
    print("| target | TTFB p50 µs | event delay p50 µs | min-max | held back |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for t, rs in rounds.items():
        delays = [r["event_delay"]["p50_us"] for r in rs]
        print(f"| {t} | {statistics.median(r['ttfb']['p50_us'] for r in rs):.1f} | "
              f"{statistics.median(delays):.1f} | {min(delays):.1f}-{max(delays):.1f} | "
              f"{sum(r['held_back'] for r in rs)} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
