"""The README's commands are the ones CI and users run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("python3 -m venv")]


def cluster_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("apt-get")]


def ci_commands() -> list[str]:
    """The commands .ci/run runs, in order (everything after `cd`, not comments or shell options)."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "set ", "cd "))]


def test_ci_runs_exactly_the_readme_test_command_then_the_cluster_command():
    readme = (ROOT / "README.md").read_text()
    ci = ci_commands()
    assert len(ci) == 2, ".ci/run must run two commands: the tests, then the cluster tests"
    assert ci[0] in command_lines(readme) and ci[0].endswith("python -m pytest -q")
    assert cluster_lines(readme) == [ci[1]], "the README's cluster command is the one .ci/run runs"
    assert "apt-get install -y slurm-wlm munge" in ci[1] and ci[1].endswith("python -m pytest -q -m cluster")


def test_the_cluster_marker_is_declared_and_kept_out_of_the_main_lane():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^\s*"cluster: ', text, re.M), "the cluster marker is declared"
    assert re.search(r'^addopts = ".*-m \\"not cluster\\"', text, re.M), "the main command must not run the cluster lane"


def test_readme_main_command_installs_and_runs_the_demo():
    cmds = command_lines((ROOT / "README.md").read_text())
    assert any(c.endswith("&& zscl demo") and "pip install -e ." in c for c in cmds)


def test_readme_names_every_subcommand_and_method_config():
    from zscl.cli.main import SUBCOMMANDS
    from zscl.runner.configs import config_registry

    readme = (ROOT / "README.md").read_text()
    for name in SUBCOMMANDS:
        assert re.search(rf"`zscl {name}\b", readme), f"README does not document `zscl {name}`"
    for name in config_registry("method").names():
        assert f"`{name}`" in readme, f"README does not document the method config {name}"
