"""environment.yml and pyproject.toml must name the same packages (conda's channels cannot be
reached from our CI machines, so this is the check we can run)."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONDA_TO_PIP = {"pytorch": "torch"}  # conda-forge names that differ from PyPI's


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower()


def _conda_packages():
    conda, pip = set(), set()
    section = None
    for line in (ROOT / "environment.yml").read_text().splitlines():
        s = line.split("#", 1)[0].rstrip()
        if not s.strip():
            continue
        if not s.startswith(" "):
            section = s.split(":")[0]
            continue
        if section != "dependencies":
            continue
        item = s.strip()
        if item == "- pip:":
            continue
        if item.startswith("- "):
            name = _name(item[2:])
            if s.startswith("      "):
                pip.add(item[2:].strip() if item[2:].startswith("-e") else name)
            else:
                conda.add(CONDA_TO_PIP.get(name, name))
    return conda, pip


def test_environment_names_the_same_packages_as_pyproject():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_name(d) for d in meta["dependencies"]}
    test = {_name(d) for d in meta["optional-dependencies"]["test"]}
    conda, pip = _conda_packages()
    conda -= {"python", "pip"}
    assert any(p.startswith("-e .") for p in pip), "environment.yml must install the kit itself from its pip section"
    assert runtime <= conda, f"missing from environment.yml: {sorted(runtime - conda)}"
    assert conda <= runtime | test, f"in environment.yml but not pyproject.toml: {sorted(conda - runtime - test)}"
    assert test <= conda | pip, f"test extras missing from environment.yml: {sorted(test - conda - pip)}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no command block"
    commands = [c.strip() for c in blocks[0].strip().splitlines() if c.strip() and not c.startswith("#")]
    assert len(commands) == 2, f"README must open with exactly two commands, found {commands}"
    test_cmd = commands[1]
    assert test_cmd in [l.strip() for l in ci.splitlines()], f".ci/run does not run README's test command {test_cmd!r}"
