"""The README's commands are the ones CI and users run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("python3 -m venv")]


def test_ci_runs_exactly_the_readme_test_command():
    ci = command_lines((ROOT / ".ci" / "run").read_text())
    assert len(ci) == 1, ".ci/run must run one command"
    assert ci[0] in command_lines((ROOT / "README.md").read_text())
    assert "pytest" in ci[0]


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
