"""The README stays true: its psql recipes run, its commands and options exist."""

import json
import re
from pathlib import Path

import pytest

from relinker.cli import build_parser, main

README = (Path(__file__).parent.parent / "README.md").read_text()
CI = (Path(__file__).parent.parent / ".ci" / "run").read_text()


def cookbook():
    section = README.split("## psql cookbook", 1)[1]
    return re.findall(r"```sql\n(.*?)```", section, re.S)


def test_the_cookbook_has_recipes():
    assert len(cookbook()) >= 6


@pytest.mark.parametrize("recipe", cookbook())
def test_cookbook_recipe_runs_against_a_real_catalogue(world, capsys, recipe):
    m = world.medium("disk")
    world.inode(m, [b"/a/ok", b"/a/../escape"], world.blob(b"content"))
    world.inode(m, [b"/b/gone"], world.blob(b"lost", store=False))
    assert main(world.argv("relink", "--json", "--no-progress", "--workers", "1", "--ranges", "2")) == 1
    run_id = json.loads(capsys.readouterr().out)["run_id"]
    assert main(world.argv("verify", "--all", "--no-progress", "--workers", "1")) == 1  # blobs that fail
    capsys.readouterr()
    # and a range that failed, as ranges do when the catalogue has surprises
    world.conn.execute("UPDATE relinker_range SET status = 'failed', last_error = 'example' "
                       "WHERE run_id = %s AND range_no = 1", (run_id,))
    rows = world.conn.execute(recipe.replace("= 7", f"= {run_id}")).fetchall()
    assert rows, f"recipe returned nothing on a run with problems:\n{recipe}"


def test_readme_test_command_is_what_ci_runs():
    commands = re.findall(r"^(python3 -m venv .*)$", README, re.M)
    assert any("tox" in c for c in commands) and any("relinker demo" in c for c in commands)
    test_command = next(c for c in commands if "tox" in c)
    assert test_command in CI


def subcommands():
    parser = build_parser([])
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def test_every_command_is_in_the_readme():
    for name in subcommands():
        assert f"`relinker {name}" in README, name


def test_every_option_is_in_the_readme():
    missing = []
    for name, command in subcommands().items():
        for action in command._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help" and f"`{flag}" not in README:
                    missing.append(f"{name} {flag}")
    assert missing == []


def test_every_test_the_readme_names_exists():
    """The guarantees table names the test behind each guarantee: a renamed test must not leave it naming none."""
    text = README
    tests = Path(__file__).parent
    defined = {name for path in tests.glob("test_*.py") for name in re.findall(r"^def (test_\w+)", path.read_text(),
                                                                               re.MULTILINE)}
    named = set(re.findall(r"::(test_\w+)", text))
    assert named and named <= defined, sorted(named - defined)
    files = set(re.findall(r"`(test_\w+\.py)", text))
    assert files and all((tests / name).exists() for name in files)
