"""cascade-train: command line. Subcommands grow with the methods; `demo` builds the demo."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cascade-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train, calibrate and export the digits demo cascade")
    demo.add_argument(
        "--repository",
        type=Path,
        default=Path("model_repository"),
        help="Triton model repository for the teacher (default: %(default)s)",
    )
    demo.add_argument(
        "--bundles",
        type=Path,
        default=Path("bundles"),
        help="where the student bundle goes (default: %(default)s)",
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true", help="rebuild even if it exists")
    demo.add_argument("--no-progress", action="store_true")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # The ONNX exporter narrates every optimisation pass at INFO.
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "demo":
        from .demo import DemoConfig, build_demo

        bundle = build_demo(
            args.repository,
            args.bundles,
            DemoConfig(seed=args.seed, progress=not args.no_progress),
            force=args.force,
        )
        print(f"bundle: {bundle.path}  threshold: {bundle.manifest.default_threshold:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
