"""`make setup` installs exact versions (constraints.txt) that satisfy pyproject.toml's ranges, and leaves the
torch build to the Makefile's TORCH."""
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, Version]:
    out = {}
    for i, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+!\-]+)", line)
        assert m, f"constraints.txt line {i}: {line!r} is not name==version"
        name = canonicalize_name(m[1])
        assert name not in out, f"constraints.txt pins {name} twice"
        out[name] = Version(m[2])
    return out


def test_constraints_pin_every_dependency_within_its_range_and_leave_torch_alone():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in meta["dependencies"] + meta["optional-dependencies"]["notebooks"] + meta["optional-dependencies"]["dev"]]
    p = pins()
    torch_build = {"torch", "torchvision", "triton"}
    assert not [n for n in p if n in torch_build or n.startswith("nvidia-")], "the torch build is TORCH's, not the lock's"
    for r in reqs:
        name = canonicalize_name(r.name)
        if name in torch_build:
            continue
        assert name in p, f"constraints.txt does not pin {name} (pyproject.toml asks for {r})"
        assert r.specifier.contains(p[name], prereleases=True), f"constraints.txt pins {name}=={p[name]}, outside pyproject.toml's {r.specifier}"


def test_make_setup_installs_with_the_constraints():
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^LOCK\s+\?=\s*constraints\.txt$", make, flags=re.M)
    assert "-c $(LOCK)" in make and "$(STAMP): pyproject.toml $(LOCK)" in make
