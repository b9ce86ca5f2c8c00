"""Import shim for `torchvision` in SGLang's own CPU engine (test tier `sglang_cpu` only).

Why it exists: SGLang 0.5.21 registers its multimodal configs' image processors with
transformers' `AutoImageProcessor` when its config package is imported, which every server start
does, even for a text-only Qwen2. transformers 5 makes `AutoImageProcessor` (and `AutoProcessor`)
a dummy that raises ImportError unless torchvision is importable, so the server dies at start-up.
The PyPI torchvision release that matches torch 2.13.0 (0.28.0) is a CUDA build: against the CPU
torch wheel its `import torchvision` fails ("operator torchvision::nms does not exist").

What it does: `import torchvision` and any `torchvision.x.y` submodule succeed; every attribute
is a placeholder class (attributes of placeholders are placeholders, the same object each time,
so transformers' module-level tables such as `InterpolationMode.BILINEAR` keys build), and
calling any placeholder raises ImportError. Text-only generation never calls torchvision; an
image request would fail loudly. `__version__` is the release that would pair with torch 2.13.0,
marked as a shim, because transformers compares it against minimum versions.
"""
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.28.0+or1shim"


class _PlaceholderMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        children = cls.__dict__["_children"]
        if name not in children:
            children[name] = _placeholder(f"{cls.__qualname__}.{name}")
        return children[name]

    def __call__(cls, *args, **kwargs):
        raise ImportError(f"{cls.__qualname__}: torchvision is only an import shim here "
                          f"(tests/sglang_shims/torchvision)")


def _placeholder(qualname):
    return _PlaceholderMeta(qualname.rsplit(".", 1)[-1], (),
                            {"_children": {}, "__qualname__": qualname})


class _ShimModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _placeholder(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers every `torchvision.*` import with an empty shim package."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _ShimModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.modules[__name__].__class__ = _ShimModule
sys.meta_path.insert(0, _SubmoduleFinder())
