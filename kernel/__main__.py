"""``python -m kernel -f CONNECTION_FILE`` starts the kernel; ``python -m kernel install`` registers it."""
import sys

if len(sys.argv) > 1 and sys.argv[1] == "install":
    from .install import main
    sys.exit(main(sys.argv[2:]))

from ipykernel.kernelapp import IPKernelApp

from .kernel import FlameKernel

IPKernelApp.launch_instance(kernel_class=FlameKernel)
