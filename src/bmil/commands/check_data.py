"""``bmil check-data``: compare a dataset folder with the published counts and list the
images that cannot be read (the checks themselves: :mod:`bmil.datasets` and :mod:`bmil.data.check`)."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    """Print the report; exit status 1 when it found a problem."""
    from bmil.datasets import check_report, get_dataset

    entry = get_dataset(args.dataset, checkable=True)
    report = check_report(args.dataset, args.root, ids_from_folders=args.ids_from_folders)
    published = bool(entry.published_counts)
    if not published:  # nothing to compare with: say what was found
        for line in report.notes:
            print(line)
        for key, value in report.counts.items():
            print(f"{key}: {value}")
    for line in report.warnings:
        print(f"warning: {line}")
    for line in report.problems:
        print(line)
    if report.problems:
        what = f"difference(s) from the published {args.dataset} dataset" if published else f"problem(s) in {args.root}"
        print(f"{len(report.problems)} {what}")
        return 1
    warned = f" ({len(report.warnings)} warning(s) above)" if report.warnings else ""
    if published:
        print(f"{args.root}: matches the published {args.dataset} counts, every image readable{warned}")
    else:
        print(f"{args.root}: no problem found, every image readable{warned}")
    return 0
