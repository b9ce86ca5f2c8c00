"""Reading Hugging Face safetensors checkpoints (single file or sharded with an index), lazily.

Tensors are read one at a time and shapes are read from headers, so validating or converting a
32B checkpoint never holds more than the tensors in use.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from or1_megatron.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"


class SafetensorsReader:
    """Name -> tensor access over every safetensors file of an HF checkpoint directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.directory}: no *.safetensors files and no {INDEX_NAME}")
            weight_map = None
        self._files = {}
        self._location: dict[str, str] = {}
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise CheckpointError(f"{index}: lists {name}, which does not exist")
            handle = safe_open(str(path), framework="pt")
            self._files[name] = handle
            for key in handle.keys():
                if key in self._location:
                    raise CheckpointError(
                        f"{self.directory}: tensor {key!r} is in both {self._location[key]} and {name}"
                    )
                self._location[key] = name
        if weight_map is not None:
            for key, name in weight_map.items():
                if self._location.get(key) != name:
                    raise CheckpointError(f"{index}: {key!r} is listed in {name} but not found there")

    def names(self) -> list[str]:
        return list(self._location)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def _handle(self, name: str):
        try:
            return self._files[self._location[name]]
        except KeyError:
            raise CheckpointError(f"{self.directory}: no tensor named {name!r}") from None
