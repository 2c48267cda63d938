"""``--help`` after a workflow's name reaches that workflow's own parser (its options), not the group's help."""
import pytest
from click.testing import CliRunner

from pipeline.cli import main as cli


@pytest.mark.parametrize("argv, option", [
    (["train", "lenses", "--help"], "--hard-negatives"),
    (["bench", "performance", "--help"], "--tiles"),
    (["photoz", "--help"], "--catalog"),
])
def test_help_after_a_workflow_name_lists_that_workflows_options(argv, option):
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 0, result.output
    assert option in result.output


def test_help_in_place_of_the_name_prints_the_commands_own_help():
    result = CliRunner().invoke(cli, ["train", "--help"])
    assert result.exit_code == 0
    assert "NAME is artefacts, photoz, morphology or lenses" in result.output
