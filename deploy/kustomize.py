"""A small Python `kustomize build` for the subset deploy/ uses, so the manifests render and are
tested offline without the kustomize binary: `resources` (files and folders with a
kustomization.yaml), `patches` (strategic-merge patches from `path` or inline `patch`, including
`$patch: delete`) and `images` (newName / newTag). Anything else in a kustomization.yaml raises
ValueError, so a manifest using a feature this does not implement fails loudly instead of
rendering wrong. tests/test_deploy_manifests.py checks its output against `kubectl kustomize`
where kubectl is installed.

    python deploy/kustomize.py deploy/overlays/cpu     # prints the rendered YAML
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "patches", "images"}
# Strategic-merge keys of the lists deploy/ patches (from the Kubernetes API's patchMergeKey);
# any other list is replaced whole, as strategic merge does for lists without a merge key.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
              "volumeMounts": "mountPath", "imagePullSecrets": "name"}


def object_id(obj: dict) -> tuple[str, str, str]:
    """(group, kind, name): how kustomize matches a patch to a resource (version ignored)."""
    group = obj.get("apiVersion", "").rpartition("/")[0]
    return group, obj.get("kind", ""), obj.get("metadata", {}).get("name", "")


def _merge(base: Any, patch: Any, field: str = "") -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = _merge(out[key], value, key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        out = [copy.deepcopy(item) for item in base]
        index = {item.get(key): i for i, item in enumerate(out) if isinstance(item, dict)}
        for item in patch:
            if isinstance(item, dict) and item.get(key) in index:
                out[index[item[key]]] = _merge(out[index[item[key]]], item, "")
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def strategic_merge(base: dict, patch: dict) -> dict:
    """`patch` merged into `base` (strategic merge for the MERGE_KEYS lists; others replaced)."""
    return _merge(base, patch)


def _load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _apply_images(obj: dict, images: list[dict]) -> None:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    for field in ("initContainers", "containers"):
        for c in spec.get(field, []) or []:
            name, _, tag = c["image"].partition(":")
            for img in images:
                if img["name"] == name:
                    new_name = img.get("newName", name)
                    new_tag = img.get("newTag", tag)
                    c["image"] = f"{new_name}:{new_tag}" if new_tag else new_name


def build(folder: str | Path) -> list[dict]:
    """The objects `kustomize build folder` renders, in resource order."""
    folder = Path(folder)
    kfile = folder / "kustomization.yaml"
    spec = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise ValueError(f"{kfile}: fields {sorted(unknown)} are not implemented by deploy/kustomize.py")
    objects: list[dict] = []
    for entry in spec.get("resources", []):
        target = folder / entry
        objects.extend(build(target) if target.is_dir() else _load_docs(target))
    for p in spec.get("patches", []):
        if set(p) - {"path", "patch"}:
            raise ValueError(f"{kfile}: patch fields {sorted(set(p) - {'path', 'patch'})} are not implemented")
        docs = _load_docs(folder / p["path"]) if "path" in p else [d for d in yaml.safe_load_all(p["patch"]) if d]
        for doc in docs:
            matches = [i for i, o in enumerate(objects) if object_id(o) == object_id(doc)]
            if len(matches) != 1:
                raise ValueError(f"{kfile}: patch {object_id(doc)} matches {len(matches)} resources")
            if doc.get("$patch") == "delete":
                del objects[matches[0]]
            else:
                objects[matches[0]] = strategic_merge(objects[matches[0]], doc)
    for obj in objects:
        _apply_images(obj, spec.get("images", []))
    return objects


if __name__ == "__main__":
    print(yaml.safe_dump_all(build(sys.argv[1]), sort_keys=False), end="")
