#!/usr/bin/env python3
"""Package meshllm.wasm as an OCI image that Istio's WasmPlugin pulls.

Istio's fetcher (pkg/wasm/imagefetcher.go, the same in Envoy Gateway) takes
three shapes: a Docker image whose last layer is a tar.gz holding
`plugin.wasm`; the same with an OCI manifest and an
`application/vnd.oci.image.layer.v1.tar+gzip` layer (Solo's "compat"
variant); and Solo's older two-layer "oci" variant with
`application/vnd.module.wasm.*` media types. It does not read the CNCF Wasm
artifact (`application/vnd.wasm.config.v0+json` config, `application/wasm`
layer), so this writes the OCI compat image: a plain OCI image with one layer
holding only `plugin.wasm`, which every registry and copy tool handles and
which Istio tries first.

Everything is deterministic (sorted JSON keys, zero timestamps and owners in
the tars, gzip mtime 0), so the same module gives the same digests. Writes,
under --out-dir:

  meshllm/            OCI image layout: oci-layout, index.json, blobs/sha256/*
  meshllm.tar         that layout as a tar (skopeo's oci-archive:)
  meshllm.wasm        the module, for HTTPS distribution
  meshllm.wasm.sha256 its sha256 in `sha256sum` format

The module's sha256 goes to stdout; push commands and the manifest digest
(what WasmPlugin `sha256:` checks for an oci:// URL) go to stderr.

With --native target/native/libmeshllm.so it packs the native build (the
Envoy dynamic module) instead, as a plain OCI image for a Kubernetes image
volume: one layer holding only `libmeshllm.so` at its root (mounted at
/var/lib/meshllm by manifests.py --build native), the platform taken from
the ELF header. Writes meshllm-native/ and meshllm-native.tar likewise.
"""

import argparse
import gzip
import hashlib
import io
import json
import shutil
import sys
import tarfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "meshllm.wasm"
DEFAULT_OUT_DIR = ROOT / "target" / "oci"

INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
# The file name Istio looks for in the layer (Solo's spec-compat.md).
PLUGIN_FILE = "plugin.wasm"
WASM_MAGIC = b"\0asm"
# The native build's file in its image (the name Envoy looks up for a
# dynamic module named `meshllm`) and the ELF machines it may be built for.
NATIVE_FILE = "libmeshllm.so"
ELF_MAGIC = b"\x7fELF"
ELF_ARCHITECTURES = {0x3E: "amd64", 0xB7: "arm64"}


def canonical_json(value):
    """JSON bytes with sorted keys and no spaces: stable digests."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(media_type, data, annotations=None):
    """OCI content descriptor of a blob."""
    desc = {"mediaType": media_type, "digest": digest(data), "size": len(data)}
    if annotations:
        desc["annotations"] = annotations
    return desc


def deterministic_tar(files):
    """Tar of {name: bytes}, directories implied by the names, in sorted
    order with zero times and root ownership, so equal input gives equal bytes."""
    dirs = {str(parent) for name in files for parent in Path(name).parents if str(parent) != "."}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(dirs | set(files)):
            info = tarfile.TarInfo(name)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if name in files:
                info.mode = 0o644
                info.size = len(files[name])
                tar.addfile(info, io.BytesIO(files[name]))
            else:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
    return buf.getvalue()


def package_metadata():
    """[package] of Cargo.toml: name, version and the fields the annotations show."""
    with open(ROOT / "Cargo.toml", "rb") as f:
        return tomllib.load(f)["package"]


def manifest_annotations(package, source):
    """Manifest annotations: Solo's compat marker and OCI's pre-defined keys."""
    annotations = {
        "module.wasm.image/variant": "compat",
        "org.opencontainers.image.title": package["name"],
        "org.opencontainers.image.version": package["version"],
        "org.opencontainers.image.description": package.get("description", ""),
        "org.opencontainers.image.licenses": package.get("license", ""),
        "org.opencontainers.image.source": source or "",
    }
    return {key: value for key, value in annotations.items() if value}


def elf_architecture(module):
    """The OCI architecture of an ELF shared object (little-endian 64-bit)."""
    if not module.startswith(ELF_MAGIC) or len(module) < 20 or module[4] != 2 or module[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    machine = int.from_bytes(module[18:20], "little")
    if machine not in ELF_ARCHITECTURES:
        raise ValueError(f"ELF machine {machine:#x} is not one Envoy runs on here")
    return ELF_ARCHITECTURES[machine]


def image_layout(module, tag, annotations, file_name=PLUGIN_FILE, platform=("wasm", "wasi")):
    """Files of an OCI image layout, {relative path: bytes}, holding one
    image tagged `tag` whose only layer is file_name = module (by default
    the compat image Istio's agent reads: plugin.wasm)."""
    layer_tar = deterministic_tar({file_name: module})
    layer = gzip.compress(layer_tar, compresslevel=9, mtime=0)
    architecture, os_name = platform
    config = canonical_json({
        "architecture": architecture,
        "os": os_name,
        "rootfs": {"type": "layers", "diff_ids": [digest(layer_tar)]},
    })
    manifest = canonical_json({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": descriptor(CONFIG_MEDIA_TYPE, config),
        "layers": [descriptor(LAYER_MEDIA_TYPE, layer)],
        "annotations": annotations,
    })
    index = canonical_json({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [descriptor(MANIFEST_MEDIA_TYPE, manifest,
                                 {"org.opencontainers.image.ref.name": tag})],
    })
    files = {
        "oci-layout": canonical_json({"imageLayoutVersion": "1.0.0"}),
        "index.json": index,
    }
    for blob in (config, layer, manifest):
        files["blobs/sha256/" + hashlib.sha256(blob).hexdigest()] = blob
    return files


def write_layout(layout_dir, files):
    """Replace layout_dir with exactly these files (no stale blobs stay)."""
    if layout_dir.exists():
        if not (layout_dir / "oci-layout").exists() and any(layout_dir.iterdir()):
            sys.exit(f"{layout_dir} exists and is not an OCI layout: not overwriting it")
        shutil.rmtree(layout_dir)
    for name, data in files.items():
        path = layout_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def push_help(out_dir, name, tag, manifest_digest, module_sha256):
    """How to push the layout and reference it from a WasmPlugin."""
    layout, archive = out_dir / name, out_dir / f"{name}.tar"
    return f"""\
OCI layout {layout} (tag {tag}), archive {archive}

Push with any of (REGISTRY like ghcr.io/you):
  skopeo copy --preserve-digests oci-archive:{archive}:{tag} docker://$REGISTRY/{name}:{tag}
  oras cp --from-oci-layout {layout}:{tag} $REGISTRY/{name}:{tag}
  crane push {layout} $REGISTRY/{name}:{tag}

WasmPlugin:
  url: oci://$REGISTRY/{name}:{tag}
  sha256: {manifest_digest.removeprefix("sha256:")}  (the image manifest's digest)
or, serving {out_dir / (name + ".wasm")} over HTTPS:
  url: https://…/{name}.wasm
  sha256: {module_sha256}  (the module's own digest)
"""


def native_help(out_dir, name, tag, manifest_digest):
    """How to push the native image and name it in the manifests."""
    layout, archive = out_dir / name, out_dir / f"{name}.tar"
    return f"""\
OCI layout {layout} (tag {tag}), archive {archive}: {NATIVE_FILE} at the image's root

Push with any of (REGISTRY like ghcr.io/you):
  skopeo copy --preserve-digests oci-archive:{archive}:{tag} docker://$REGISTRY/{name}:{tag}
  oras cp --from-oci-layout {layout}:{tag} $REGISTRY/{name}:{tag}
  crane push {layout} $REGISTRY/{name}:{tag}

Then (an image volume in the proxy's pod):
  python3 k8s/tools/manifests.py --build native --module-image $REGISTRY/{name}@{manifest_digest} --out-dir DIR
"""


def pack_native(path, out_dir, tag, source):
    """--native: the dynamic module as an image for an image volume."""
    module = path.read_bytes()
    try:
        architecture = elf_architecture(module)
    except ValueError as error:
        sys.exit(f"{path}: {error}")
    package = package_metadata()
    name = f"{package['name']}-native"
    annotations = manifest_annotations(package, source or package.get("repository"))
    del annotations["module.wasm.image/variant"]
    files = image_layout(module, tag or package["version"], annotations, NATIVE_FILE,
                         (architecture, "linux"))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_layout(out_dir / name, files)
    (out_dir / f"{name}.tar").write_bytes(deterministic_tar(files))
    manifest_digest = json.loads(files["index.json"])["manifests"][0]["digest"]
    print(native_help(out_dir, name, tag or package["version"], manifest_digest), file=sys.stderr)
    print(manifest_digest)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wasm", type=Path, default=DEFAULT_WASM, help="module to package")
    parser.add_argument("--native", type=Path, metavar="LIBMESHLLM_SO",
                        help="pack this native build (libmeshllm.so) for an image volume instead")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--tag", help="image tag (default: Cargo.toml's version)")
    parser.add_argument("--source", help="org.opencontainers.image.source URL "
                        "(default: Cargo.toml's repository, if any)")
    args = parser.parse_args()
    if args.native:
        pack_native(args.native, args.out_dir, args.tag, args.source)
        return

    module = args.wasm.read_bytes()
    if not module.startswith(WASM_MAGIC):
        sys.exit(f"{args.wasm} is not a Wasm module (no \\0asm header)")
    package = package_metadata()
    name = package["name"]
    tag = args.tag or package["version"]
    annotations = manifest_annotations(package, args.source or package.get("repository"))

    files = image_layout(module, tag, annotations)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_layout(args.out_dir / name, files)
    (args.out_dir / f"{name}.tar").write_bytes(deterministic_tar(files))
    (args.out_dir / f"{name}.wasm").write_bytes(module)
    module_sha256 = hashlib.sha256(module).hexdigest()
    (args.out_dir / f"{name}.wasm.sha256").write_text(f"{module_sha256}  {name}.wasm\n")

    manifest_digest = json.loads(files["index.json"])["manifests"][0]["digest"]
    print(push_help(args.out_dir, name, tag, manifest_digest, module_sha256), file=sys.stderr)
    print(module_sha256)


if __name__ == "__main__":
    main()
