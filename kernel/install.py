"""Install the flamebook kernelspec."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

KERNEL_NAME = "flamebook"
DISPLAY_NAME = "Python 3 (flamebook)"


def kernelspec(python: str | None = None) -> dict:
    return {
        "argv": [python or sys.executable, "-m", "kernel", "-f", "{connection_file}"],
        "display_name": DISPLAY_NAME,
        "language": "python",
        # SIGINT reaches the kernel at once and interrupts a blocking wait on a remote call;
        # runners live in their own sessions, so the pool (not the signal) stops their work.
        "interrupt_mode": "signal",
        "metadata": {"debugger": False},
    }


def install(user: bool = False, prefix: str | None = None) -> str:
    """Write the kernelspec and return where it went."""
    from jupyter_client.kernelspec import KernelSpecManager
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        with open(os.path.join(tmp, "kernel.json"), "w") as f:
            json.dump(kernelspec(), f, indent=1)
        return KernelSpecManager().install_kernel_spec(tmp, KERNEL_NAME, user=user, prefix=prefix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernel install",
                                     description="Install the flamebook kernelspec.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user")
    where.add_argument("--sys-prefix", action="store_true", help="install into sys.prefix (the venv)")
    where.add_argument("--prefix", help="install under this prefix")
    args = parser.parse_args(argv)
    prefix = sys.prefix if args.sys_prefix else args.prefix
    dest = install(user=args.user, prefix=prefix)
    print(f"Installed kernelspec {KERNEL_NAME} in {dest}")
    return 0
