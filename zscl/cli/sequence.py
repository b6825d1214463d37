"""``zscl sequence``: a whole continual benchmark with one method; resumable; writes results.json.

    zscl sequence --config configs/benchmark/mtil_order1.yaml --config configs/method/zscl.yaml --out DIR

``--print_config`` prints the fully resolved configuration (the benchmark, its overrides for this
method, the method's config, command-line keys) and exits without touching data.
Configs deep-merge left to right; any key can be overridden after them (``--model.lr``,
``--data.data_root``, ``--trainer.devices 2 --trainer.strategy ddp``, ``--steps 100``).
``--check-data`` runs ``zscl check-data`` on the run's data before the first task;
``--allow-bad-test-images`` (``--data.allow_bad_test_images true``) excludes and counts
unreadable test images instead of stopping.
"""

from __future__ import annotations

import sys
from zscl.runner.build import bad_image_flags, build_parser, trainer_defaults  # noqa: F401  (public names of this CLI)


def check_before_run(cfg, argv: list[str]) -> None:
    """``zscl check-data`` on the run's data, in every process that was not started by Lightning's DDP
    launcher (those start after the check passed in their parent; under torchrun or SLURM every rank
    checks, so that all of them stop together)."""
    import os

    from zscl.cli.check_data import needs_reference, print_report, run_check

    if os.environ.get("LOCAL_RANK", "0") != "0" and "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c") and os.path.isfile(argv[i + 1])]
    reports = run_check(cfg, reference=needs_reference(cfg, configs), workers=max(1, cfg.data.num_workers),
                        progress=cfg.progress != "none")
    if not print_report(reports):
        raise ValueError("--check-data found problems in the data (listed above); nothing was run")


def main(argv: list[str]) -> int:
    from zscl.cli.errors import report_errors
    from zscl.utils.quiet import quiet_lightning
    from zscl.runner.build import parse_run
    from zscl.runner.sequence import SequenceRunner

    from zscl.runner import signals

    quiet_lightning()
    signals.install()  # SIGTERM/SIGINT: checkpoint at the next step, exit 75 (zscl.runner.signals)
    with report_errors("zscl sequence") as status:
        check, show = "--check-data" in argv, "--print_config" in argv
        parser, cfg = parse_run([a for a in argv if a != "--print_config"])
        if show:  # the fully resolved run (benchmark, its overrides for this method, the method, command-line keys)
            print(parser.dump(cfg, skip_none=False), end="")
            return 0
        if check:
            check_before_run(cfg, parser_argv(argv))
        SequenceRunner(parser, cfg).run()
    return status.code


def parser_argv(argv: list[str]) -> list[str]:
    from zscl.runner.build import prepare_argv

    return prepare_argv(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
