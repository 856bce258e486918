"""Entry point of the `ovsam-batch` command.

Each subcommand lives in its own module and is registered here; the modules parse and validate
options into typed configs and call into `pipelines/` or `jobs/`.
"""

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ovsam-batch")
def main() -> None:
    """Dataset bootstrapping with Open-Vocabulary SAM: a mask and a name for every object."""


def _register() -> None:
    # Subcommands register themselves here, one import each.
    from ovsam_batch import eval_cmd

    main.add_command(eval_cmd.main)
    from ovsam_batch import train_cmd

    main.add_command(train_cmd.main)
    from ovsam_batch import show_cmd

    main.add_command(show_cmd.main)
    from ovsam_batch import report_cmd

    main.add_command(report_cmd.main)
    from ovsam_batch import label_cmd

    main.add_command(label_cmd.label)
    pass


_register()
