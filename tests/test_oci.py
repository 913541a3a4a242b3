"""k8s/tools/oci.py: the OCI image layout of the filter is well formed, its
digests are right, and Istio's fetcher would find the module in it.

Runs the tool on a small fake module; needs neither the built filter nor Envoy.
"""

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.wasm_only("OCI packaging of the .wasm for Istio's WasmPlugin")

ROOT = Path(__file__).resolve().parent.parent
OCI_TOOL = ROOT / "k8s" / "tools" / "oci.py"

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
# What Istio's extractOCIStandardImage demands of the image's last layer.
ISTIO_COMPAT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def fake_module(seed=b""):
    """A few KB with the Wasm header Istio checks (magic and version)."""
    return b"\0asm\x01\0\0\0" + hashlib.sha256(seed).digest() * 200


def run_tool(module, out_dir, *args):
    wasm = out_dir.parent / f"{out_dir.name}-input.wasm"
    wasm.write_bytes(module)
    return subprocess.run(
        [sys.executable, str(OCI_TOOL), "--wasm", str(wasm), "--out-dir", str(out_dir), *args],
        capture_output=True, text=True, timeout=60)


def blob(layout, digest):
    algorithm, hex_digest = digest.split(":")
    assert algorithm == "sha256"
    return (layout / "blobs" / "sha256" / hex_digest).read_bytes()


def read_verified(layout, desc):
    """The blob a descriptor points at, after checking its digest and size."""
    data = blob(layout, desc["digest"])
    assert desc["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert desc["size"] == len(data)
    return data


def the_manifest(layout):
    index = json.loads((layout / "index.json").read_text())
    return json.loads(read_verified(layout, index["manifests"][0]))


def istio_extract(layout):
    """The module as Istio's fetcher takes it from a compat image with an OCI
    manifest: the last layer must be an OCI tar+gzip layer, gunzipped, and the
    first entry whose base name is plugin.wasm is the module."""
    layer = the_manifest(layout)["layers"][-1]
    assert layer["mediaType"] == ISTIO_COMPAT_LAYER
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob(layout, layer["digest"])))) as tar:
        for member in tar:
            if Path(member.name).name == "plugin.wasm":
                return tar.extractfile(member).read()
    raise AssertionError("no plugin.wasm in the layer")


@pytest.fixture
def module():
    return fake_module()


@pytest.fixture
def built(tmp_path, module):
    """(out dir, completed tool run) for the fake module."""
    out = tmp_path / "oci"
    result = run_tool(module, out, "--tag", "1.2.3", "--source", "https://example.com/meshllm")
    assert result.returncode == 0, result.stderr
    return out, result


def test_layout_has_the_oci_layout_files_and_one_tagged_manifest(built):
    layout = built[0] / "meshllm"
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    # One image: `crane push DIR` needs --index otherwise.
    [entry] = index["manifests"]
    assert entry["mediaType"] == MANIFEST_MEDIA_TYPE
    assert entry["annotations"] == {"org.opencontainers.image.ref.name": "1.2.3"}


def test_every_descriptor_matches_its_blob_and_no_other_blob_is_there(built):
    layout = built[0] / "meshllm"
    index = json.loads((layout / "index.json").read_text())
    manifest_desc = index["manifests"][0]
    manifest = json.loads(read_verified(layout, manifest_desc))
    for desc in [manifest["config"], *manifest["layers"]]:
        read_verified(layout, desc)
    referenced = {d["digest"].split(":")[1]
                  for d in [manifest_desc, manifest["config"], *manifest["layers"]]}
    assert {p.name for p in (layout / "blobs" / "sha256").iterdir()} == referenced


def test_manifest_is_the_compat_image_istio_reads(built):
    layout = built[0] / "meshllm"
    manifest = the_manifest(layout)
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == MANIFEST_MEDIA_TYPE
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    # Solo's spec-compat: exactly one layer, marked as the compat variant.
    assert [layer["mediaType"] for layer in manifest["layers"]] == [ISTIO_COMPAT_LAYER]
    assert manifest["annotations"]["module.wasm.image/variant"] == "compat"
    assert manifest["annotations"]["org.opencontainers.image.title"] == "meshllm"
    assert manifest["annotations"]["org.opencontainers.image.source"] == "https://example.com/meshllm"
    cargo_version = tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"]
    assert manifest["annotations"]["org.opencontainers.image.version"] == cargo_version


def test_config_diff_id_is_the_uncompressed_layer(built):
    layout = built[0] / "meshllm"
    manifest = the_manifest(layout)
    config = json.loads(blob(layout, manifest["config"]["digest"]))
    layer_tar = gzip.decompress(blob(layout, manifest["layers"][0]["digest"]))
    assert config["rootfs"] == {"type": "layers",
                                "diff_ids": ["sha256:" + hashlib.sha256(layer_tar).hexdigest()]}
    assert (config["os"], config["architecture"]) == ("wasi", "wasm")


def test_layer_holds_only_plugin_wasm_with_the_module_bytes(built, module):
    layout = built[0] / "meshllm"
    layer = blob(layout, the_manifest(layout)["layers"][0]["digest"])
    assert layer[4:8] == b"\0\0\0\0"  # gzip header mtime
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        [member] = tar.getmembers()
        assert (member.name, member.isfile(), member.mode, member.mtime, member.uid) == \
            ("plugin.wasm", True, 0o644, 0, 0)
        assert tar.extractfile(member).read() == module
    assert istio_extract(layout) == module


def test_tarball_holds_the_layout(built):
    out = built[0]
    layout = out / "meshllm"
    on_disk = {str(p.relative_to(layout)): p.read_bytes()
               for p in layout.rglob("*") if p.is_file()}
    with tarfile.open(out / "meshllm.tar") as tar:
        in_tar = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())
    assert in_tar == on_disk


def test_prints_and_writes_the_module_sha256(built, module):
    out, result = built
    expected = hashlib.sha256(module).hexdigest()
    assert result.stdout == expected + "\n"
    assert (out / "meshllm.wasm.sha256").read_text() == f"{expected}  meshllm.wasm\n"
    assert (out / "meshllm.wasm").read_bytes() == module


def test_help_names_push_commands_and_both_digests(built):
    out, result = built
    manifest_digest = json.loads((out / "meshllm" / "index.json").read_text())["manifests"][0]["digest"]
    assert f"skopeo copy --preserve-digests oci-archive:{out}/meshllm.tar:1.2.3 docker://" in result.stderr
    assert f"oras cp --from-oci-layout {out}/meshllm:1.2.3 " in result.stderr
    assert f"crane push {out}/meshllm " in result.stderr
    assert f"sha256: {manifest_digest.removeprefix('sha256:')}" in result.stderr
    assert f"sha256: {result.stdout.strip()}" in result.stderr


def test_same_module_gives_identical_bytes(tmp_path, module):
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        assert run_tool(module, out).returncode == 0

    def contents(out):
        return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    assert contents(runs[0]) == contents(runs[1])


def test_default_tag_is_cargo_version(tmp_path, module):
    out = tmp_path / "oci"
    assert run_tool(module, out).returncode == 0
    index = json.loads((out / "meshllm" / "index.json").read_text())
    cargo_version = tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"]
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == cargo_version


def test_new_module_replaces_the_old_blobs(tmp_path):
    out = tmp_path / "oci"
    assert run_tool(fake_module(b"old"), out).returncode == 0
    new = fake_module(b"new")
    assert run_tool(new, out).returncode == 0
    layout = out / "meshllm"
    assert istio_extract(layout) == new
    assert len(list((layout / "blobs" / "sha256").iterdir())) == 3


@pytest.mark.parametrize("content", [b"", b"not wasm at all", b"\x7fELF\x02\x01\x01\0"])
def test_refuses_what_is_not_a_wasm_module(tmp_path, content):
    out = tmp_path / "oci"
    result = run_tool(content, out)
    assert result.returncode != 0
    assert "not a Wasm module" in result.stderr
    assert not out.exists()


def test_refuses_to_replace_a_directory_that_is_not_a_layout(tmp_path, module):
    out = tmp_path / "oci"
    (out / "meshllm").mkdir(parents=True)
    (out / "meshllm" / "keep.txt").write_text("mine")
    result = run_tool(module, out)
    assert result.returncode != 0
    assert (out / "meshllm" / "keep.txt").read_text() == "mine"


# --- the native build (--native libmeshllm.so) for a Kubernetes image volume

def fake_native_module(machine=0x3E):
    """An ELF header (64-bit, little-endian, shared object, `machine`) and
    some bytes: all the tool reads of the module."""
    header = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + (3).to_bytes(2, "little") + machine.to_bytes(2, "little")
    return header + hashlib.sha256(b"native").digest() * 100


def run_native(module, out_dir, *args):
    path = out_dir.parent / "libmeshllm.so"
    path.write_bytes(module)
    return subprocess.run([sys.executable, str(OCI_TOOL), "--native", str(path), "--out-dir", str(out_dir),
                           *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("machine, architecture", [(0x3E, "amd64"), (0xB7, "arm64")])
def test_native_image_holds_only_the_module_at_its_root(tmp_path, machine, architecture):
    module = fake_native_module(machine)
    out = tmp_path / "oci"
    result = run_native(module, out)
    assert result.returncode == 0, result.stderr
    layout = out / "meshllm-native"
    manifest = the_manifest(layout)
    assert manifest["mediaType"] == MANIFEST_MEDIA_TYPE
    # A plain image any runtime mounts: its platform, one gzip tar layer.
    config = json.loads(read_verified(layout, manifest["config"]))
    assert (config["os"], config["architecture"]) == ("linux", architecture)
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    layer_tar = gzip.decompress(read_verified(layout, layer))
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer_tar).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(layer_tar)) as tar:
        (member,) = tar.getmembers()
        # Where manifests.py --build native expects it under the mount.
        assert member.name == "libmeshllm.so" and member.isfile()
        assert tar.extractfile(member).read() == module
    assert "module.wasm.image/variant" not in manifest["annotations"]
    # The manifest digest on stdout; how to push and use it on stderr.
    index = json.loads((layout / "index.json").read_text())
    assert result.stdout.strip() == index["manifests"][0]["digest"]
    assert "--build native --module-image" in result.stderr
    assert (out / "meshllm-native.tar").exists()
    # The Wasm image is not touched.
    assert not (out / "meshllm").exists()


def test_native_image_is_deterministic(tmp_path):
    first, second = tmp_path / "a" / "oci", tmp_path / "b" / "oci"
    for out in (first, second):
        out.parent.mkdir()
        assert run_native(fake_native_module(), out).returncode == 0
    assert (first / "meshllm-native.tar").read_bytes() == (second / "meshllm-native.tar").read_bytes()


@pytest.mark.parametrize("content", [b"\0asm\x01\0\0\0", b"\x7fELF\x01\x01\x01" + b"\0" * 20,
                                     fake_native_module(machine=0x28)])
def test_native_refuses_what_is_not_a_loadable_module(tmp_path, content):
    result = run_native(content, tmp_path / "oci")
    assert result.returncode != 0
    assert not (tmp_path / "oci" / "meshllm-native").exists()
