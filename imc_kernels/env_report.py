"""Print :func:`imc_kernels.build_info` for a bug report.

Usage::

    python -m imc_kernels.env_report          # readable
    python -m imc_kernels.env_report --json   # machine-readable
"""

from __future__ import annotations

import argparse
import json

from imc_kernels._build_info import build_info


def format_report(info: dict[str, object]) -> str:
    """``key: value`` lines, keys aligned; list values one item per indented line."""
    width = max(len(key) for key in info)
    lines = ["imc_kernels environment"]
    for key, value in info.items():
        if isinstance(value, list):
            lines.append(f"  {key:<{width}} :")
            lines.extend(f"  {'':<{width}}   - {item}" for item in value)
        else:
            lines.append(f"  {key:<{width}} : {value}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m imc_kernels.env_report", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    info = build_info()
    print(json.dumps(info, indent=2) if args.json else format_report(info))


if __name__ == "__main__":
    main()
