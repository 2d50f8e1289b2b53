"""`helm lint` and `helm template` for this repository's chart, through Helm's own Go SDK
(helm-python-sdk on PyPI bundles it): no helm binary to download, the same linter and renderer.

    python deploy/chart.py lint deploy/helm/cascade [-f VALUES] [--set K=V]
    python deploy/chart.py template deploy/helm/cascade [--name N] [--namespace NS] [-f/--set]

`template` prints the rendered manifests as one YAML stream (what `helm template` prints), for
kubernetes-validate or `kubectl apply -f -`. Both exit non-zero on any lint finding above info
or any render or schema error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import helm_python as helm

KUBE_VERSION = "v1.30.0"  # the oldest Kubernetes the chart is checked against (Chart.yaml: >=1.27)
_SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def _merge(into: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def values_of(files: list[Path], sets: list[str]) -> dict[str, Any]:
    """-f files in order, then --set expressions, later ones winning (helm's order)."""
    values: dict[str, Any] = {}
    for file in files:
        _merge(values, helm.values_from_yaml(file.read_text()))
    for expression in sets:
        _merge(values, helm.parse_set_string(expression))
    return values


def lint(chart: Path, values: dict[str, Any]) -> int:
    report = helm.lint(chart, values, strict=True, kube_version=KUBE_VERSION)
    failed = bool(report["errors"])
    for message in report["messages"]:
        severity = message["severity"]
        print(f"[{_SEVERITY.get(severity, severity)}] {message['path']}: {message['error']}")
        failed |= severity >= 2
    for error in report["errors"]:
        print(f"[ERROR] {error}")
    print(
        f"{report['total_charts_linted']} chart(s) linted, {'failed' if failed else 'no failures'}"
    )
    return 1 if failed else 0


def template(chart: Path, values: dict[str, Any], name: str, namespace: str) -> int:
    loaded = helm.Chart.load(chart)
    try:
        loaded.validate_schema(values)
        rendered = loaded.render(values, name=name, namespace=namespace, is_install=True)
    finally:
        loaded.close()
    for path in sorted(rendered):
        body = rendered[path].strip()
        if not body or path.endswith("NOTES.txt"):
            continue
        # The same header helm template writes, so a reader can find the template.
        for document in body.split("\n---\n"):
            document = document.strip().removeprefix("---").strip()
            if document:
                sys.stdout.write(f"---\n# Source: {path}\n{document}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["lint", "template"])
    parser.add_argument("chart", type=Path)
    parser.add_argument("-f", "--values", type=Path, action="append", default=[])
    parser.add_argument("--set", action="append", default=[], dest="sets")
    parser.add_argument("--name", default="cascade")
    parser.add_argument("--namespace", default="default")
    args = parser.parse_args(argv)
    values = values_of(args.values, args.sets)
    try:
        if args.command == "lint":
            return lint(args.chart, values)
        return template(args.chart, values, args.name, args.namespace)
    except helm.HelmError as e:
        print(f"{args.command} failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
