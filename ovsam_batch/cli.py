"""Entry point of the `ovsam-batch` command.

Each subcommand lives in its own module; the modules parse and validate options into typed configs and
call into `pipelines/` or `jobs/`.
"""

import click

from ovsam_batch import eval_cmd, label_cmd, report_cmd, show_cmd, train_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ovsam-batch")
def main() -> None:
    """Dataset bootstrapping with Open-Vocabulary SAM: a mask and a name for every object."""


main.add_command(label_cmd.label)
main.add_command(train_cmd.main)
main.add_command(eval_cmd.main)
main.add_command(show_cmd.main)
main.add_command(report_cmd.main)
