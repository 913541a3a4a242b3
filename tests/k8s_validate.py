"""Offline validation of the manifests under k8s/.

Every kustomize directory is rendered with `kubectl kustomize` and each
document is checked without a cluster: Istio resources against the
openAPIV3Schema of Istio's own CRDs (k8s/crds), everything else against
Kubernetes' schemas shipped with kubernetes-validate. Both are strict: the API
server silently prunes fields a schema does not declare, so a misspelt field
would otherwise apply cleanly and do nothing.
"""

import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S_ROOT = ROOT / "k8s"
CRDS = K8S_ROOT / "crds" / "istio-1.30.3-crds.yaml"
KUBERNETES_VERSION = "1.32"

# The file names kustomize accepts for a kustomization.
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# The CRD schemas leave metadata to the API server; this is the part of
# ObjectMeta a manifest should set.
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": DNS_SUBDOMAIN},
        "namespace": {"type": "string", "maxLength": 63, "pattern": DNS_LABEL},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
    "additionalProperties": False,
}


def render(kustomize_dir):
    """The documents `kubectl kustomize kustomize_dir` renders."""
    result = subprocess.run(["kubectl", "kustomize", str(kustomize_dir)],
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {kustomize_dir}: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def istio_schemas(crd_path=CRDS):
    """{(group, version, kind): openAPIV3Schema} for every served version of
    every CRD in crd_path."""
    schemas = {}
    with open(crd_path) as f:
        for crd in filter(None, yaml.safe_load_all(f)):
            spec = crd["spec"]
            for version in spec["versions"]:
                if version["served"]:
                    key = (spec["group"], version["name"], spec["names"]["kind"])
                    schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


def _rewrite(schema, rewrite_one):
    """rewrite_one applied to a copy of schema and of every schema nested in
    it; schema itself is left as it was."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {name: _rewrite(sub, rewrite_one)
                                for name, sub in schema["properties"].items()}
    for keyword in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(keyword), dict):
            schema[keyword] = _rewrite(schema[keyword], rewrite_one)
    for keyword in ("oneOf", "anyOf", "allOf"):
        if keyword in schema:
            schema[keyword] = [_rewrite(sub, rewrite_one) for sub in schema[keyword]]
    return rewrite_one(schema)


def _close(schema):
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    return schema


def strict(schema):
    """A copy of schema in which every object with declared properties
    refuses undeclared ones. Objects marked x-kubernetes-preserve-unknown-fields
    (free-form values such as EnvoyFilter patches or WasmPlugin pluginConfig)
    stay open, as do maps (additionalProperties already set)."""
    return _rewrite(schema, _close)


def _allow_null(schema):
    # OpenAPI's `nullable: true` is JSON Schema's null type; the CRDs use it
    # for protobuf wrapper values (numbers and booleans).
    if schema.get("nullable") and "type" in schema:
        schema["type"] = [schema["type"], "null"]
    return schema


def _istio_resource_schema(crd_schema):
    """The whole-document schema: the CRD's strict schema plus the fields the
    CRD leaves to the API server."""
    schema = strict(_rewrite(crd_schema, _allow_null))
    schema["properties"] = {**schema["properties"], "apiVersion": {"type": "string"},
                            "kind": {"type": "string"}, "metadata": METADATA}
    schema["required"] = [*schema.get("required", []), "metadata"]
    return schema


def _istio_errors(doc, schemas, group, version, kind):
    crd_schema = schemas.get((group, version, kind))
    if crd_schema is None:
        return [f"{group}/{version} {kind} is not a kind Istio's CRDs serve"]
    validator = jsonschema.Draft7Validator(_istio_resource_schema(crd_schema))
    errors = sorted(validator.iter_errors(doc), key=lambda error: error.json_path)
    return [f"{error.json_path}: {error.message}" for error in errors]


def _kubernetes_errors(doc):
    # kubernetes-validate stops at the first error.
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{error.json_path}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [error.message]
    return []


def validate(doc, schemas):
    """Errors in one rendered document, each "Kind/name: where: what";
    empty when it is valid. schemas is what istio_schemas returns."""
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return [f"{kind}/{name}: apiVersion and kind must be strings"]
    group, _, version = api_version.rpartition("/")
    if group.endswith("istio.io"):
        errors = _istio_errors(doc, schemas, group, version, kind)
    else:
        errors = _kubernetes_errors(doc)
    return [f"{kind}/{name}: {error}" for error in errors]


def kustomize_dirs(k8s_root=K8S_ROOT):
    """Every directory under k8s_root holding a kustomization, except the
    CRDs' (they are validation input, not manifests)."""
    crds = Path(k8s_root) / "crds"
    return sorted({found.parent
                   for file_name in KUSTOMIZATION_FILES
                   for found in Path(k8s_root).rglob(file_name)
                   if crds not in found.parents})
