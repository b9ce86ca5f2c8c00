"""requirements/gpu.txt, the GPU image's pins, is one consistent and complete set for Linux x86_64
CPython 3.12, and the Dockerfile installs exactly it.

Offline: every line is an exact `name==version` pin, one per name; or1-megatron's install_requires
and `gpu` extra are met by the pins; the Dockerfile installs the file's wheels, builds each
`# source-only:` pin, pins nothing else and ends with `pip check`.

Against the package index (skipped, with the reason, when the index cannot be reached):
- each `# source-only:` pin exists there as an sdist at its version; a stub wheel carrying that
  sdist's PKG-INFO requirements stands in for it, so its requirements are resolved too;
- pip's resolver, run as a dry run for CPython 3.12 on manylinux x86_64 and reading only metadata
  (HTTP range requests: no wheel is downloaded whole), resolves the file plus setup.py's
  requirements to exactly the pinned set, nothing unpinned, and torch's CUDA is the base image's;
- the same resolution of a copy with transformers==5.24.0 (sglang 0.5.21 pins 5.12.1) fails with
  pip's ResolutionImpossible naming transformers==5.24.0, so the check can fail. It reads the
  metadata the first run fetched (offline, to save a second 40 s of round trips), and the
  unchanged file resolves the same way.

The resolver evaluates python_version markers for 3.12 and the other markers for the machine it
runs on, which must be Linux x86_64 (CI is).
"""
from __future__ import annotations

import ast
import email
import hashlib
import io
import json
import os
import re
import ssl
import subprocess
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import InvalidSdistFilename, canonicalize_name, parse_sdist_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
GPU_TXT = ROOT / "requirements" / "gpu.txt"
DOCKERFILE = ROOT / "Dockerfile"
SETUP_PY = ROOT / "setup.py"

INDEX_URL = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple/").rstrip("/") + "/"
# Ubuntu 24.04 has glibc 2.39: every manylinux tag up to 2_39 installs there.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(39, 16, -1)] + [
    "manylinux2014_x86_64", "linux_x86_64"]
SOURCE_ONLY = re.compile(r"^#\s*source-only:\s*(\S+)\s*$")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)$")
NETWORK_ERROR = re.compile(
    r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|"
    r"Name or service not known|Network is unreachable|Connection refused|Read timed out|"
    r"ConnectTimeoutError|Could not fetch URL")
# pip settings of this machine that would change what is resolved (find-links, extra indexes,
# constraints) are left out; only these reach the resolver.
PIP_ENV_KEPT = {"PIP_INDEX_URL", "PIP_CERT", "PIP_CLIENT_CERT", "PIP_TRUSTED_HOST", "PIP_PROXY",
                "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES"}


def parse_pins(text: str) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
    """(wheel pins, source-only pins), each {canonical name: (name as written, version)}."""
    pins: dict[str, tuple[str, str]] = {}
    source: dict[str, tuple[str, str]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        marked = SOURCE_ONLY.match(line)
        if not line or (line.startswith("#") and not marked):
            continue
        spec = marked.group(1) if marked else line
        match = PIN.match(spec)
        assert match, f"requirements/gpu.txt:{number}: not an exact `name==version` pin: {raw!r}"
        key = canonicalize_name(match.group(1))
        assert key not in pins and key not in source, f"requirements/gpu.txt:{number}: {key} twice"
        (source if marked else pins)[key] = (match.group(1), match.group(2))
    return pins, source


def setup_requirements() -> list[str]:
    """setup.py's install_requires and its `gpu` extra, read without running setup.py."""
    tree = ast.parse(SETUP_PY.read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "setup")
    keywords = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords
                if keyword.arg in ("install_requires", "extras_require")}
    return list(keywords["install_requires"]) + list(keywords["extras_require"]["gpu"])


def all_pins() -> dict[str, tuple[str, str]]:
    pins, source = parse_pins(GPU_TXT.read_text())
    return {**pins, **source}


def base_image_cuda() -> str:
    match = re.search(r"^FROM nvidia/cuda:(\d+\.\d+)\.\d+-cudnn-devel-ubuntu24\.04\s*$",
                      DOCKERFILE.read_text(), re.M)
    assert match, "the Dockerfile's base is not an nvidia/cuda X.Y.Z-cudnn-devel-ubuntu24.04 image"
    return match.group(1)


# --- offline ----------------------------------------------------------------------------------

def test_every_line_is_one_exact_pin():
    pins, source = parse_pins(GPU_TXT.read_text())
    assert {"torch", "sglang", "megatron-core", "ray", "transformer-engine"} <= set(pins)
    assert "transformer-engine-torch" in source


def test_setup_py_requirements_are_met_by_the_pins():
    pins = all_pins()
    unmet = []
    for text in setup_requirements():
        requirement = Requirement(text)
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned is None or not requirement.specifier.contains(pinned[1], prereleases=True):
            unmet.append(f"{text} (pinned: {pinned[1] if pinned else 'nothing'})")
    assert not unmet, f"setup.py asks for what requirements/gpu.txt does not pin: {unmet}"


def test_dockerfile_installs_the_pins_and_nothing_else():
    dockerfile = DOCKERFILE.read_text()
    base_image_cuda()
    assert re.search(r"pip install --no-deps --only-binary=:all: -r requirements/gpu\.txt",
                     dockerfile)
    _, source = parse_pins(GPU_TXT.read_text())
    for name, _ in source.values():  # each source-only pin is picked out of gpu.txt by name
        assert f"'^{name}=='" in dockerfile, f"the Dockerfile does not install {name}"
    pins = all_pins()
    for name, version in re.findall(r"\b([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+!_-]*)",
                                    dockerfile):
        if name == "pip":
            continue
        assert pins.get(canonicalize_name(name), (None, None))[1] == version, (
            f"the Dockerfile names {name}=={version}, which requirements/gpu.txt does not pin")
    steps = re.findall(r"^RUN\b((?:.*\\\n)*.*)$", dockerfile, re.M)
    assert steps[-1].rstrip().endswith("pip check"), "the image's last build step is not pip check"


# --- against the package index ----------------------------------------------------------------

def _ssl_context() -> ssl.SSLContext:
    cafile = os.environ.get("PIP_CERT")
    return ssl.create_default_context(cafile=cafile if cafile and Path(cafile).is_file() else None)


def _get(url: str, accept: str = "*/*", timeout: float = 30) -> tuple[bytes, str]:
    request = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=timeout, context=_ssl_context()) as answer:
        return answer.read(), answer.headers.get("Content-Type", "")


@pytest.fixture(scope="module")
def index():
    try:
        _get(INDEX_URL + "pip/", timeout=15)
    except (urllib.error.URLError, OSError) as error:
        pytest.skip(f"package index {INDEX_URL} unreachable: {error}")
    return INDEX_URL


def _sdist(name: str, version: str) -> tuple[str, bytes]:
    """The sdist of name==version on the index: (file name, content, sha256-checked)."""
    body, kind = _get(INDEX_URL + canonicalize_name(name) + "/",
                      accept="application/vnd.pypi.simple.v1+json, text/html;q=0.1")
    if "json" in kind:
        files = [(f["filename"], urllib.parse.urljoin(INDEX_URL, f["url"]),
                  f.get("hashes", {}).get("sha256")) for f in json.loads(body)["files"]]
    else:
        files = []
        for href, filename in re.findall(r'<a[^>]*href="([^"]+)"[^>]*>([^<]+)</a>', body.decode()):
            url, _, fragment = href.partition("#")
            files.append((filename.strip(), urllib.parse.urljoin(INDEX_URL + name + "/", url),
                          fragment.partition("sha256=")[2] or None))
    for filename, url, sha256 in files:
        try:
            sdist_name, sdist_version = parse_sdist_filename(filename)
        except InvalidSdistFilename:  # a wheel
            continue
        if sdist_name == canonicalize_name(name) and sdist_version == Version(version):
            content, _ = _get(url, timeout=120)
            assert sha256 is None or hashlib.sha256(content).hexdigest() == sha256, filename
            return filename, content
    pytest.fail(f"{name}=={version} (source-only in requirements/gpu.txt) has no sdist "
                f"on {INDEX_URL}")


def write_stub_wheel(directory: Path, name: str, version: str, headers: list[str]) -> None:
    """A wheel holding nothing but metadata (`headers`: Requires-Dist and the like), which the
    resolver treats like the real distribution."""
    stem = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}"
    metadata = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", *headers]
    with zipfile.ZipFile(directory / f"{stem}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{stem}.dist-info/METADATA", "\n".join(metadata) + "\n")
        wheel.writestr(f"{stem}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: stub\n"
                       "Root-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{stem}.dist-info/RECORD", "")


def stub_from_sdist(directory: Path, sdist: bytes) -> str:
    """A stub wheel with the sdist's PKG-INFO requirements, so that the resolver treats a
    source-only pin like any other and checks its requirements; returns the sdist's version."""
    with tarfile.open(fileobj=io.BytesIO(sdist)) as archive:
        member = next(m for m in archive.getmembers() if m.name.count("/") == 1
                      and m.name.endswith("/PKG-INFO"))
        headers = archive.extractfile(member).read().decode().split("\n\n", 1)[0]
    message = email.message_from_string(headers)
    kept = [line for line in headers.splitlines()
            if line.split(":", 1)[0] in ("Requires-Python", "Requires-Dist", "Provides-Extra")]
    write_stub_wheel(directory, message["Name"], message["Version"], kept)
    return message["Version"]


def stub_from_report(directory: Path, metadata: dict) -> None:
    """A stub wheel with the metadata that pip's --report gives for a resolved distribution."""
    headers = []
    if metadata.get("requires_python"):
        headers.append(f"Requires-Python: {metadata['requires_python']}")
    headers += [f"Provides-Extra: {extra}" for extra in metadata.get("provides_extra", [])]
    headers += [f"Requires-Dist: {req}" for req in metadata.get("requires_dist", [])]
    write_stub_wheel(directory, metadata["name"], metadata["version"], headers)


@pytest.fixture(scope="module")
def stubs(index, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("source-only-stubs")
    _, source = parse_pins(GPU_TXT.read_text())
    for name, version in source.values():
        _, content = _sdist(name, version)
        assert stub_from_sdist(directory, content) == version, f"{name}'s sdist is not {version}"
    return directory


def resolver_command(requirements: Path, find_links: Path, report: Path) -> list[str]:
    """pip's resolver for Linux x86_64 CPython 3.12, metadata only: a dry run installs nothing."""
    _, source = parse_pins(requirements.read_text())
    return [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
            "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            *[arg for platform in PLATFORMS for arg in ("--platform", platform)],
            # metadata by HTTP range requests: the index serves no separate metadata files
            # (PEP 658), and without this pip downloads every wheel whole (about 4.5 GB)
            "--use-feature=fast-deps", "--find-links", str(find_links), "--report", str(report),
            "-r", str(requirements), *[f"{n}=={v}" for n, v in source.values()],
            *setup_requirements()]


def run_resolver(command: list[str]) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("PIP_") or key in PIP_ENV_KEPT}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    output = done.stdout + done.stderr
    if done.returncode != 0 and NETWORK_ERROR.search(output):
        pytest.skip(f"package index unreachable during resolution: {output[-500:]}")
    return done


@pytest.fixture(scope="module")
def pinned(stubs, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The resolver's run on requirements/gpu.txt (about 40 s, mostly waiting on the index) and
    its report."""
    report = tmp_path_factory.mktemp("pinned") / "report.json"
    return run_resolver(resolver_command(GPU_TXT, stubs, report)), report


def test_the_pins_resolve_to_exactly_themselves(pinned):
    done, report = pinned
    assert done.returncode == 0, f"pip cannot resolve requirements/gpu.txt:\n{done.stderr[-4000:]}"
    installed = {canonicalize_name(item["metadata"]["name"]): item
                 for item in json.loads(report.read_text())["install"]}
    resolved = {name: Version(item["metadata"]["version"]) for name, item in installed.items()}
    pins = {name: Version(version) for name, (_, version) in all_pins().items()}
    assert resolved == pins, (
        f"resolved but not pinned: {sorted(set(resolved) - set(pins))}; "
        f"pinned but not resolved: {sorted(set(pins) - set(resolved))}; other versions: "
        f"{sorted(n for n in set(resolved) & set(pins) if resolved[n] != pins[n])}")
    # torch's own CUDA (the cuda-toolkit version its wheel requires) is the base image's
    toolkit = [r for r in installed["torch"]["metadata"]["requires_dist"]
               if canonicalize_name(Requirement(r).name) == "cuda-toolkit"]
    assert toolkit, "torch requires no cuda-toolkit: not a CUDA build"
    versions = [str(s.version) for s in Requirement(toolkit[0]).specifier]
    assert versions and all(v.startswith(base_image_cuda() + ".") for v in versions), (
        f"torch is built for {toolkit[0]}, the Dockerfile's base has CUDA {base_image_cuda()}")


def test_a_conflicting_pin_fails_and_names_the_package(pinned, tmp_path):
    """The same resolution of a copy of gpu.txt with transformers==5.24.0 (sglang 0.5.21 pins
    5.12.1). To save a second 40 s of index round trips it reads the metadata that the first run
    fetched (its report, as stub wheels, with --no-index) plus transformers 5.24.0's, fetched
    here; the unchanged pins resolve the same way, so the failure is the pin's."""
    done, report = pinned
    assert done.returncode == 0, "needs the pins' own resolution to pass first"
    metadata = tmp_path / "metadata"
    metadata.mkdir()
    for item in json.loads(report.read_text())["install"]:
        stub_from_report(metadata, item["metadata"])
    text = GPU_TXT.read_text()
    assert "\ntransformers==5.12.1\n" in text  # sglang 0.5.21's own pin
    conflicting = tmp_path / "gpu.txt"
    conflicting.write_text(text.replace("\ntransformers==5.12.1\n", "\ntransformers==5.24.0\n"))
    fetched = run_resolver([
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
        "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
        "--use-feature=fast-deps", "--report", str(tmp_path / "one.json"), "transformers==5.24.0"])
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    for item in json.loads((tmp_path / "one.json").read_text())["install"]:
        stub_from_report(metadata, item["metadata"])

    for requirements, should_pass in ((GPU_TXT, True), (conflicting, False)):
        done = run_resolver([*resolver_command(requirements, metadata, tmp_path / "r.json"),
                             "--no-index"])
        assert (done.returncode == 0) == should_pass, (requirements, done.stderr[-3000:])
    errors = "\n".join(line for line in done.stderr.splitlines() if line.startswith("ERROR"))
    assert "ResolutionImpossible" in errors, done.stderr[-3000:]
    assert re.search(r"^ERROR: Cannot install .*transformers==5\.24\.0", errors, re.M), errors
