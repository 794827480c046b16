"""Validate manifests strictly against the Kubernetes API's own schemas, offline.

Built-in kinds are checked against the OpenAPI schemas ``kubernetes-validate`` ships for
each Kubernetes release, in their strict form (an unknown field, or one newer than the
release, is an error, as the API server's strict field validation would make it); custom
resources against the ``openAPIV3Schema`` of their CRD's served version, from
``k8s/crds/``. A kind with neither is an error, never a skip: a manifest nothing checked
must not pass as checked.

Validators are built once per (release, kind) and reused: a 10,000-trial sweep renders
20,000 or 30,000 manifests of three kinds, and building the validator is most of the cost.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from trainyard.errors import ConfigError

VERSIONS = ("1.30", "1.31", "1.32", "1.33")  # the releases trainyard's manifests target


class SchemaError(ConfigError):
    """A manifest the API server would refuse."""


def validate(manifest: dict[str, Any], version: str) -> None:
    """Raise :class:`SchemaError` naming the first field the schema refuses."""
    validator = _validator(str(version), manifest.get("apiVersion", ""), manifest.get("kind", ""))
    error = next(iter(validator.iter_errors(manifest)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        name = manifest.get("metadata", {}).get("name")
        raise SchemaError(
            f"{manifest['kind']}/{name} is not valid for Kubernetes {version}: at {where}: "
            f"{error.message[:300]}",
            fix="correct the setting that produced it (cluster.* or k8s/)",
        )


@functools.cache
def _validator(version: str, api_version: str, kind: str) -> Any:
    crd = _crd_schema(api_version, kind)
    if crd is not None:
        import jsonschema

        return jsonschema.validators.Draft7Validator(crd)  # CRDs: OpenAPI v3, draft 4-7
    return _builtin_validator(version, api_version, kind)


def _builtin_validator(version: str, api_version: str, kind: str) -> Any:
    try:
        import jsonschema
        import kubernetes_validate
        from kubernetes_validate.utils import schema_contents
        from referencing import Registry, Resource
    except ImportError:
        raise ConfigError(
            "validating Kubernetes manifests needs kubernetes-validate",
            fix="pip install 'trainyard[k8s]'",
        ) from None
    group = api_version.split("/")[0].split(".")[0] if "/" in api_version else ""
    schema_api = f"{group}-{api_version.split('/')[-1]}" if group else api_version
    folder = f"kubernetes-json-schema/v{_full(version)}-local-strict"
    try:
        schema = schema_contents(f"{folder}/{kind.lower()}-{schema_api}.json", version)
        definitions = schema_contents(f"{folder}/_definitions.json", version)
    except (FileNotFoundError, kubernetes_validate.utils.VersionNotSupportedError):
        raise SchemaError(
            f"no schema for {kind} ({api_version}) in Kubernetes {version}, and no CRD in "
            "k8s/crds/: it cannot be checked",
            fix="add the CRD to k8s/crds/, or use a kind the API server serves",
        ) from None
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def _full(version: str) -> str:
    """The patch release kubernetes-validate ships for ``version`` (1.30 -> 1.30.0)."""
    from kubernetes_validate.utils import all_versions, major_minor

    matching = [v for v in all_versions() if major_minor(v) == major_minor(version)]
    if not matching:
        raise SchemaError(f"kubernetes-validate has no schemas for Kubernetes {version}")
    return matching[-1]


def _crd_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "k8s" / "crds"


@functools.cache
def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the openAPIV3Schema of each served version in k8s/crds/."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    schemas = {}
    for path in sorted(_crd_dir().glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=loader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for served in crd["spec"]["versions"]:
            if served.get("served", True):
                schema = served["schema"]["openAPIV3Schema"]
                schemas[(f"{group}/{served['name']}", kind)] = schema
    return schemas


def _crd_schema(api_version: str, kind: str) -> dict[str, Any] | None:
    if "/" not in api_version or "." not in api_version.split("/")[0]:
        return None  # the core and built-in groups without a domain (v1, batch/v1)
    schema = _crd_schemas().get((api_version, kind))
    return None if schema is None else _strict(schema)


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused, as the API server's strict field validation
    refuses them (a CRD's schema lists its fields but rarely says that others are not
    allowed); where it preserves unknown fields, they stay allowed."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    keeps = schema.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in schema and "additionalProperties" not in schema and not keeps:
        out["additionalProperties"] = False
    return out
