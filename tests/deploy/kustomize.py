"""A small kustomize renderer for deploy/k8s/ (no kubectl or kustomize binary here).

It implements exactly what deploy/k8s uses and refuses everything else, so that a
manifest change it cannot render faithfully fails loudly instead of rendering wrong:

- a Kustomization's ``resources`` (files, or directories built recursively),
  ``components`` (kind Component: their resources, then their patches, applied to
  what the including kustomization has accumulated so far), ``patches`` (``path``
  entries, strategic-merge only: no ``target``, no JSON6902) and ``images``
  (``newName`` / ``newTag`` / ``digest``), in kustomize's order: resources,
  components, patches, images;
- strategic merge as kustomize v5 does it for these fields: maps merge, ``null``
  deletes a key, a top-level ``$patch: delete`` deletes the object; lists with a
  merge key (``MERGE_KEYS``) merge item by item (the patch's items first, in its
  order, then the original's other items), the lists in ``ATOMIC`` are replaced,
  and a list under any other field is an error.

Cross-checked against ``kubectl kustomize`` in tests/deploy/test_k8s_manifests.py
where a kubectl binary is at hand (agreed with kustomize v5.5.0 and v5.6.0).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

# field -> merge key (the patchMergeKey of the Kubernetes types); "ports" is a container's
# (containerPort) or a Service's (port).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "ports": "containerPort|port",
}
ATOMIC = {"args", "command", "tolerations", "envFrom", "accessModes"}
_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "components", "patches", "images"}


class Unsupported(ValueError):
    """A kustomization feature this renderer does not implement."""


def render(directory: Path) -> list[Obj]:
    """The objects `kustomize build directory` would output (in accumulation order)."""
    return _build(directory.resolve(), component=False, acc=[])


def _kustomization(directory: Path) -> Obj:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (directory / name).exists():
            doc = yaml.safe_load((directory / name).read_text()) or {}
            unknown = set(doc) - _KUSTOMIZATION_KEYS
            if unknown:
                raise Unsupported(f"{directory}: kustomization fields {sorted(unknown)}")
            return dict(doc)
    raise FileNotFoundError(f"no kustomization in {directory}")


def _build(directory: Path, component: bool, acc: list[Obj]) -> list[Obj]:
    k = _kustomization(directory)
    if (k.get("kind") == "Component") != component:
        raise Unsupported(f"{directory}: kind {k.get('kind')} where component={component}")
    for entry in k.get("resources", []):
        path = directory / entry
        for obj in render(path) if path.is_dir() else load_documents(path):
            if _find(acc, object_id(obj)) is not None:
                raise ValueError(f"{directory}: duplicate object {object_id(obj)}")
            acc.append(obj)
    for entry in k.get("components", []):
        _build((directory / entry).resolve(), component=True, acc=acc)
    for entry in k.get("patches", []):
        if set(entry) != {"path"}:
            raise Unsupported(f"{directory}: patch entry {entry} (only `path:` is supported)")
        for patch in load_documents(directory / entry["path"]):
            _apply(acc, patch, directory)
    for image in k.get("images", []):
        _set_image(acc, image)
    return acc


def load_documents(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def object_id(obj: Obj) -> tuple[str, str, str]:
    group = obj["apiVersion"].rsplit("/", 1)[0] if "/" in obj["apiVersion"] else ""
    return group, obj["kind"], obj["metadata"]["name"]


def _find(objs: list[Obj], oid: tuple[str, str, str]) -> int | None:
    hits = [i for i, o in enumerate(objs) if object_id(o) == oid]
    return hits[0] if hits else None


def _apply(acc: list[Obj], patch: Obj, where: Path) -> None:
    i = _find(acc, object_id(patch))
    if i is None:
        raise ValueError(f"{where}: patch matches no object: {object_id(patch)}")
    if patch.get("$patch") == "delete":
        del acc[i]
        return
    acc[i] = merge(acc[i], patch)


def merge(original: Obj, patch: Obj, field: str = "") -> Obj:
    """Strategic merge of patch into original (a new object; the inputs are not modified)."""
    out = copy.deepcopy(original)
    for key, value in patch.items():
        if key.startswith("$"):
            raise Unsupported(f"directive {key} under {field or 'the top'}")
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, key)
        elif isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = _merge_list(key, out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_list(field: str, original: list[Any], patch: list[Any]) -> list[Any]:
    if field in ATOMIC:
        return copy.deepcopy(patch)
    if field not in MERGE_KEYS:
        raise Unsupported(f"list field {field!r}: merge semantics not implemented")
    candidates = MERGE_KEYS[field].split("|")
    key = next(k for k in candidates if all(k in item for item in patch))
    by_key = {item[key]: item for item in original}
    merged = [merge(by_key[p[key]], p, field) if p[key] in by_key else p for p in patch]
    patched = {p[key] for p in patch}
    return copy.deepcopy(merged) + [copy.deepcopy(o) for o in original if o[key] not in patched]


def _set_image(acc: list[Obj], image: Obj) -> None:
    if set(image) - {"name", "newName", "newTag", "digest"}:
        raise Unsupported(f"images entry {image}")
    for obj in acc:
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            name, tag = _split_image(c["image"])
            if name != image["name"]:
                continue
            if "digest" in image:
                tag = "@" + image["digest"]
            elif "newTag" in image:
                tag = ":" + image["newTag"]
            c["image"] = image.get("newName", name) + tag


def _split_image(ref: str) -> tuple[str, str]:
    """('registry:5000/name', ':tag' | '@sha256:...' | '')."""
    if "@" in ref:
        name, digest = ref.split("@", 1)
        return name, "@" + digest
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon:]
    return ref, ""
