"""Wheels for a GPU box with no network: what `make gpu-bundle` carries and `benchmarks/gpu.sh`
installs there.

The box (the device tool's 'cuda' image) has Python 3.12 with torch, transformers, torchvision,
Pillow, numpy and many more, but no package index, no Beam and no pydantic.

    python3.12 -m benchmarks.bundle lock    # rewrite benchmarks/gpu-requirements.txt (index, ~30 s)
    python3 -m benchmarks.bundle size .whl  # one version of each package, at most 60 MiB
    python3 -m benchmarks.bundle check      # on the box, after the install: pins it breaks

`lock` resolves captionflow's dependencies that the box lacks (apache-beam, at the version pinned
in constraints.txt, and pydantic; extras such as [gcp] are left out: the benchmark reads and writes
local files) with pip's resolver under constraints.txt, and keeps every package of that closure
which the box does not have, plus the few it has at a version that breaks a pin (BOX_VERSIONS,
CARRY_ANYWAY). Run it with a Python 3.12, as on the box, so that markers resolve as they will there.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO / "benchmarks" / "gpu-requirements.txt"
LIMIT_MIB = 60

# Python packages of the device tool's 'cuda' image (read there on 2026-11-17, .library/device/
# KINDS.md): these are not carried unless their version breaks a pin (below).
BOX_HAS = frozenset(
    """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
    jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
    lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py
    mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja
    numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
    pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf
    psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
    pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
    scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz
    torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
    treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug
    wheel wrapt xarray xxhash yarl zipp
    """.split()
)
# Versions known on the box (same reading): one that breaks a pin of the closure is carried.
BOX_VERSIONS = {
    "numpy": "2.5.2",
    "torch": "2.11.0",
    "torchvision": "0.26.0",
    "transformers": "5.17.0",
    "tokenizers": "0.23.2",
    "huggingface-hub": "1.33.0",
    "safetensors": "0.8.0",
}
# The box's version is unknown, the newest release breaks Beam's pin and the wheel is small.
CARRY_ANYWAY = {
    "protobuf": "newest 7.x breaks Beam's protobuf<7",
    "python-dateutil": "newest 4.x breaks Beam's python-dateutil<3",
}
# Left to the box although its version may break a pin: too big for the 60 MiB, or paired with
# the box's own builds (torchvision's image code uses its Pillow). `check` reports them there.
LEFT_TO_BOX = {
    "pyarrow": "a 48 MiB wheel; Beam uses it for Arrow batches and Parquet IO",
    "pillow": "7 MiB; the box's torchvision goes with it; Beam uses it only in ML transforms",
}
PLATFORMS = ["manylinux1_x86_64", "manylinux2014_x86_64"] + [
    f"manylinux_2_{n}_x86_64" for n in range(17, 40)
]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _packaging():
    """packaging's Requirement and Version; pip's own copy where packaging is not installed."""
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.version import Version
    return Requirement, Version


def roots() -> list[str]:
    """captionflow's dependencies that the box lacks, without extras or versions."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[\[<>=!~; ]", spec, maxsplit=1)[0] for spec in project["dependencies"]]
    return [name for name in names if canonical(name) not in BOX_HAS]


def lock() -> None:
    Requirement, Version = _packaging()
    if sys.version_info[:2] != (3, 12):
        print(f"warning: Python {sys.version.split()[0]}, the box has 3.12: markers may differ")
    wanted = roots()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp, "report.json")
        pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed"]
        options = ["--quiet", "--only-binary=:all:", "--report", str(report)]
        subprocess.run([*pip, *options, "-c", str(REPO / "constraints.txt"), *wanted], check=True)
        installs = json.loads(report.read_text())["install"]
    versions = {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}
    broken: dict[str, list[str]] = {}  # box package -> the pins its known version breaks
    for item in installs:
        for spec in item["metadata"].get("requires_dist", []):
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            box = BOX_VERSIONS.get(canonical(req.name))
            if box and not req.specifier.contains(Version(box), prereleases=True):
                broken.setdefault(canonical(req.name), []).append(
                    f"box has {box}, {item['metadata']['name']} needs {req.name}{req.specifier}"
                )
    lines = []
    for name in sorted(versions):
        why = ""
        if name in broken:
            why = "; ".join(broken[name])
        elif name in CARRY_ANYWAY:
            why = f"box version unknown, {CARRY_ANYWAY[name]}"
        elif name in BOX_HAS:
            continue
        lines.append(f"{name}=={versions[name]}" + (f"  # {why}" if why else ""))
    header = [
        "# Wheels that `make gpu-bundle` downloads (cp312, manylinux x86_64, --no-deps) into",
        "# .whl/ for a GPU box with Python 3.12, torch, transformers, torchvision and Pillow but",
        "# no network, Beam or pydantic; `bash benchmarks/gpu.sh` installs them there offline.",
        f"# Generated by `python3.12 -m benchmarks.bundle lock` from {', '.join(wanted)} under",
        "# constraints.txt: rerun it after changing constraints.txt or the box's package list",
        "# (benchmarks/bundle.py). Left to the box though its version may break a pin:",
        *(f"#   {name}: {why}" for name, why in LEFT_TO_BOX.items()),
    ]
    REQUIREMENTS.write_text("\n".join(header + lines) + "\n")
    print(f"{REQUIREMENTS.relative_to(REPO)}: {len(lines)} packages")


def size(folder: Path) -> None:
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"no wheels in {folder}")
    seen: dict[str, str] = {}
    total = 0
    for wheel in wheels:
        name, version = wheel.name.split("-")[:2]
        name = canonical(name)
        if name in seen:
            raise SystemExit(f"two versions of {name} in {folder}: {seen[name]} and {version}")
        seen[name] = version
        total += wheel.stat().st_size
        print(f"  {wheel.stat().st_size / 2**20:6.2f} MiB  {wheel.name}")
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {folder} (limit {LIMIT_MIB} MiB)")
    if total > LIMIT_MIB * 2**20:
        raise SystemExit(f"the bundle is over {LIMIT_MIB} MiB")


def check(site: Path) -> None:
    """On the box: every requirement of the bundle's packages against what Python will import
    (the bundle first, then the box's own). Warnings only: the benchmark decides."""
    from importlib import metadata

    Requirement, Version = _packaging()
    problems, count = [], 0
    for dist in metadata.distributions(path=[str(site)]):
        count += 1
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                found = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                problems.append(f"{dist.metadata['Name']} needs {req}: missing")
                continue
            if not req.specifier.contains(Version(found), prereleases=True):
                problems.append(f"{dist.metadata['Name']} needs {req}: found {found}")
    print(f"bundle: {count} packages in {site}; pins not met: {len(problems)}")
    for line in problems:
        print(f"  warning: {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("lock", help=f"rewrite {REQUIREMENTS.relative_to(REPO)} (needs the index)")
    sub.add_parser("size", help="one version of each package, total size").add_argument(
        "folder", type=Path
    )
    sub.add_parser("check", help="on the box: pins the installed set breaks").add_argument(
        "site", type=Path, nargs="?", default=Path("/tmp/site")
    )
    sub.add_parser("platforms", help="the --platform options for pip download")
    args = parser.parse_args()
    if args.command == "lock":
        lock()
    elif args.command == "size":
        size(args.folder)
    elif args.command == "check":
        check(args.site)
    else:
        print(" ".join(f"--platform {p}" for p in [*PLATFORMS, "any"]))


if __name__ == "__main__":
    main()
