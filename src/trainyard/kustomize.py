"""Render the kustomizations in ``k8s/`` in Python, as ``kubectl kustomize`` does.

The Kubernetes backend builds every trial's manifests from the same files users apply with
``kubectl apply -k``, so what trainyard submits and what they apply cannot drift apart. It
cannot count on a kustomize binary (Debian's kubectl is too old for ``patches:``, and pods
submitting from a laptop may have none), so this module implements the part of kustomize
that ``k8s/`` uses: ``resources`` (files and other kustomizations) and ``patches``
(strategic merge, from a file or inline, with ``$patch: delete``). Anything else in a
kustomization is refused rather than ignored, and a test compares the result with
``kubectl kustomize`` where one is installed.

Strategic merge follows Kubernetes' rules for the fields ``k8s/`` patches: maps merge key
by key; lists of named items (containers, env, volumes, volumeMounts, ports) merge by
``name``; any other list is replaced.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

_KNOWN = {"apiVersion", "kind", "resources", "patches"}
_DELETE = "$patch"


class KustomizeError(ValueError):
    pass


def build(directory: str | Path) -> list[dict[str, Any]]:
    """The resources the kustomization in ``directory`` renders, in file order."""
    root = Path(directory)
    spec = yaml.safe_load((root / "kustomization.yaml").read_text()) or {}
    unknown = set(spec) - _KNOWN
    if unknown:
        raise KustomizeError(
            f"{root / 'kustomization.yaml'}: {', '.join(sorted(unknown))} not supported by "
            "trainyard's renderer (resources and strategic-merge patches are)"
        )
    resources: list[dict[str, Any]] = []
    for entry in spec.get("resources") or []:
        path = root / entry
        resources += build(path) if path.is_dir() else _documents(path.read_text())
    for patch in spec.get("patches") or []:
        if set(patch) - {"path", "patch"}:
            raise KustomizeError(f"{root}: patches entries take path or patch only: {patch}")
        text = (root / patch["path"]).read_text() if "path" in patch else patch["patch"]
        for document in _documents(text):
            resources = apply_patch(resources, document)
    return resources


def _documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def _same(resource: dict, patch: dict) -> bool:
    return resource.get("kind") == patch.get("kind") and resource.get("metadata", {}).get(
        "name"
    ) == patch.get("metadata", {}).get("name")


def apply_patch(resources: list[dict], patch: dict) -> list[dict]:
    """``resources`` with the strategic-merge ``patch`` applied to the one it names."""
    matches = [r for r in resources if _same(r, patch)]
    if len(matches) != 1:
        name = f"{patch.get('kind')}/{patch.get('metadata', {}).get('name')}"
        raise KustomizeError(f"patch for {name} matches {len(matches)} resources, not one")
    if patch.get(_DELETE) == "delete":
        return [r for r in resources if r is not matches[0]]
    merged = merge(matches[0], patch)
    return [merged if r is matches[0] else r for r in resources]


def merge(base: Any, patch: Any) -> Any:
    """Kubernetes' strategic merge of ``patch`` into ``base`` (neither is modified)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and _named(base) and _named(patch):
        return _merge_named(base, patch)
    return copy.deepcopy(patch)


def _named(items: list) -> bool:
    return bool(items) and all(isinstance(i, dict) and "name" in i for i in items)


def _merge_named(base: list[dict], patch: list[dict]) -> list[dict]:
    out = [copy.deepcopy(item) for item in base]
    for item in patch:
        index = next((i for i, b in enumerate(out) if b["name"] == item["name"]), None)
        if item.get(_DELETE) == "delete":
            if index is not None:
                del out[index]
        elif index is None:
            out.append(copy.deepcopy(item))
        else:
            out[index] = merge(out[index], item)
    return out
