"""Checkpoint tensors by name, read from a model directory's safetensors (one file or shards)."""

from __future__ import annotations

import json
import os

import torch


def safetensors_files(path: str) -> list[str]:
    """The checkpoint's safetensors files; [] when it has none (e.g. only pytorch_model.bin)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    return [single] if os.path.exists(single) else []


class Checkpoint:
    """Lazy access to every tensor of a checkpoint, converted to one dtype on one device."""

    def __init__(self, path: str, dtype: torch.dtype, device: torch.device) -> None:
        from safetensors import safe_open

        self.dtype, self.device = dtype, device
        self._where: dict[str, str] = {}
        for file in safetensors_files(path):
            with safe_open(file, "pt") as f:
                self._where.update(dict.fromkeys(f.keys(), file))
        if not self._where:
            raise FileNotFoundError(f"no safetensors weights in {path!r}")

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._where[name], "pt") as f:
            t = f.get_tensor(name)
        return t.to(device=self.device, dtype=self.dtype)

    def maybe(self, name: str) -> torch.Tensor | None:
        return self.get(name) if name in self else None
