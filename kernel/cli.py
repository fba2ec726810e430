"""The ``flamebook`` command."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flamebook", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="boot a pool, stream output, let it idle out")
    srv = sub.add_parser("serve", help="run a script with a flame node inside it: flamebook serve -- python app.py")
    srv.add_argument("args", nargs=argparse.REMAINDER)
    inst = sub.add_parser("install-kernel", help="register the flamebook Jupyter kernel")
    inst.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "serve":
        from flame import serve_script
        return serve_script(args.args)
    if args.command == "install-kernel":
        from .install import main as install
        return install(args.args)
    if args.command == "demo":
        from .demo import main as demo
        return demo()
    return 2


if __name__ == "__main__":
    sys.exit(main())
