"""The `ovsam-batch label` command line: documented options and one-line errors for bad input (no Ray needed)."""

from __future__ import annotations

import re

from click.testing import CliRunner

from ovsam_batch.cli import main


def _invoke(*args: str):
    return CliRunner().invoke(main, ["label", *args])


def test_help_documents_every_option_with_an_example():
    result = _invoke("--help")
    assert result.exit_code == 0
    options = set(re.findall(r"--[a-z][a-z-]+", result.output))
    for option in ("--output", "--mode", "--prompts", "--vocabulary", "--preset", "--weights", "--coco", "--address",
                   "--runtime-env", "--gpus-per-worker", "--workers", "--batch-size", "--limit", "--endpoint-url",
                   "--points-per-side", "--top-k"):
        assert option in options
    assert "ovsam-batch label examples/images --output demo-output --coco" in result.output


def test_bad_options_and_inputs_end_in_one_line_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (("in", "-o", "out", "--mode", "box"), "--mode box needs --prompts"),
        (("in", "-o", "out", "--batch-size", "0"), "--batch-size must be >= 1"),
        (("in", "-o", "out", "--weights", "clip2sam"), "expected PART=SOURCE"),
        (("in", "-o", "out", "--weights", "decoder=x.pth"), "part must be one of"),
        (("in", "-o", "out", "--preset", "no-such-model"), "unknown model preset"),
        ((str(empty), "-o", str(tmp_path / "out"), "--weights", f"clip2sam={tmp_path}/missing.pth"),
         "does not exist"),
        ((str(tmp_path / "nothing-here"), "-o", str(tmp_path / "out")), "does not exist"),
        ((str(empty), "-o", str(tmp_path / "out2")), "no images found"),
        ((str(empty), "-o", str(empty / "labels")), "inside the input"),
        ((str(empty), "-o", str(tmp_path / "out3"), "--mode", "box", "--prompts", str(tmp_path / "p.json")),
         "cannot read prompts file"),
    ]
    for args, message in cases:
        result = _invoke(*args)
        assert result.exit_code != 0, args
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output and not isinstance(result.exception, (TypeError, AttributeError))


def _commands(group, prefix=()):
    import click

    for name in group.list_commands(None):
        command = group.get_command(None, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def test_every_command_has_an_example_and_every_option_a_description():
    commands = dict(_commands(main))
    assert {("label",), ("eval",), ("show",), ("report",), ("train", "clip2sam"), ("train", "sam2clip"),
            ("train", "precompute-teacher")} <= set(commands)
    for path, command in commands.items():
        result = CliRunner().invoke(main, [*path, "--help"])
        assert result.exit_code == 0, path
        assert "Example" in result.output and f"ovsam-batch {' '.join(path)} " in result.output, path
        undescribed = [param.opts[-1] for param in command.params
                       if getattr(param, "param_type_name", "") == "option" and not param.help
                       and param.name != "help"]
        assert not undescribed, (path, undescribed)


def test_eval_help_speaks_only_of_runs_label_can_make():
    assert "point" not in CliRunner().invoke(main, ["eval", "--help"]).output.lower()
