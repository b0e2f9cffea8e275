"""The Jupyter kernel the reports run in: ``backpack-nb``, this Python environment's own,
installed into it on first use (``python -m backpack_nb.reports kernel``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from .errors import UserError
from .runfiles import read_json, write_json

KERNEL_NAME = "backpack-nb"
# ipykernel >= 7.4 warns at every start that its sockets are plain TCP; they listen on 127.0.0.1
# only and every message is signed with the kernel's key, so the kernel is registered to log
# errors only (one line of noise less in every run, papermill's and JupyterLab's too).
KERNEL_QUIET = "--IPKernelApp.log_level=ERROR"


def ensure_kernel(name: str = KERNEL_NAME, quiet: bool = True) -> str:
    """The Jupyter kernel ``name`` of this Python environment, installed into it
    (``python -m ipykernel install --sys-prefix --name NAME``) when missing, and registered
    to start without the TCP warning (:data:`KERNEL_QUIET`)."""
    # Jupyter, papermill and nbconvert are imported where they are used: `import backpack_nb`
    # (and the notebooks' helpers) must not pay for them.
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise UserError(f"--name {name!r}: a kernel name is ASCII letters, digits, '-', '.' "
                        f"and '_' (the default is {KERNEL_NAME})")
    specs = KernelSpecManager()
    try:
        python = Path(specs.get_kernel_spec(name).argv[0])
    except (NoSuchKernel, IndexError):
        python = None
    if python is None or not (python == Path(sys.executable)
                              or python.name.startswith("python") and python.exists()):
        cmd = [sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", name,
               "--display-name", f"Python ({name})"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise UserError(f"could not install the Jupyter kernel {name!r} ({' '.join(cmd)}):\n"
                            f"{out.stderr.strip()}")
        if not quiet:
            print(f"installed the Jupyter kernel {name!r} into {sys.prefix}")
    spec = specs.get_kernel_spec(name)
    if KERNEL_QUIET not in spec.argv:
        kernel_json = Path(spec.resource_dir) / "kernel.json"
        try:
            info = read_json(kernel_json)
            write_json(kernel_json, {**info, "argv": [*info["argv"], KERNEL_QUIET]})
        except (OSError, ValueError, KeyError, TypeError, UserError):
            pass  # a read-only or unusual kernel.json keeps its warning; nothing else depends on it
    return name
