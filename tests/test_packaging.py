"""pyproject.toml and environment.yml declare the same dependencies; the README opens with the two commands."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r): r.replace(" ", "") for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    import yaml  # PyYAML comes with papermill
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda = {_name(r): r.replace(" ", "") for r in pip_section if not r.startswith("-e")}
    assert conda == declared


def test_torch_bounds_admit_the_local_wheels():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name, local in (("torch", (2, 14, 1)), ("torchvision", (0, 29, 1))):
        spec = next(d for d in deps if _name(d) == name)
        assert "==" not in spec and "<" not in spec
        low = tuple(int(x) for x in spec.split(">=")[1].split("."))
        assert low <= local


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```(?:sh|bash)?\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    commands = [l for l in first_block if l.strip() and not l.strip().startswith("#")]
    assert commands == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\nmake test\n" in ci
