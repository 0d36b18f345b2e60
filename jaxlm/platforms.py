"""Which JAX platforms a command may start: no TPU runtime on a host without a TPU.

With libtpu installed (`pip install -e ".[tpu]"`), JAX tries the TPU backend on every host.
On a host without a TPU chip that try fails quietly as far as JAX is concerned, but libtpu
first writes its own error block to stderr (`E0000 ... unexpected worker hostname`, `No
jellyfish device found`) that reads as a failure; its log-level variables
(`TPU_MIN_LOG_LEVEL`, `TPU_STDERR_LOG_LEVEL`) do not reach those lines. So every CLI calls
`skip_absent_tpu()` before JAX starts its backends, and on a plain CPU host JAX is told to
use the CPU alone (`JAX_PLATFORMS=cpu`), which is what it ends up using anyway.

A leaf: imports nothing from jaxlm, and not JAX itself.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

# Google's PCI vendor id: every TPU chip a host can see shows up under it (JAX checks the same),
# and so do a Compute Engine VM's virtual NIC (gVNIC) and NVMe disk, which are no TPU. Any other
# Google device counts as a TPU, so a TPU generation newer than this list still loads libtpu.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_GOOGLE_NOT_TPU = {"0x0042", "0x001f"}  # gVNIC, Compute Engine NVMe


def skip_absent_tpu() -> bool:
    """Restricts JAX to the CPU when libtpu is installed but this host has no TPU and no GPU.

    Call before JAX initialises its backends (the first `jax.devices()` or computation). Left
    alone: a platform choice the user made (`JAX_PLATFORMS`, even empty, or
    `jax.config.update("jax_platforms", ...)`), `JAX_FORCE_TPU_INIT`, a host where a TPU may be
    attached (a Google PCI device, `/dev/accel*`, a `/dev/vfio` group) and a host with a GPU,
    where JAX's own choice stands. Returns True if it restricted JAX to the CPU. The setting is
    inherited by the processes this one starts.
    """
    if "JAX_PLATFORMS" in os.environ or "JAX_FORCE_TPU_INIT" in os.environ:
        return False
    jax = sys.modules.get("jax")
    if jax is not None and jax.config.jax_platforms:
        return False
    if importlib.util.find_spec("libtpu") is None or tpu_may_be_attached() or _gpu_visible():
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"
    if jax is not None:  # already imported: it read the variable then, so tell it directly
        jax.config.update("jax_platforms", "cpu")
    return True


def tpu_may_be_attached() -> bool:
    """True if this host shows any sign of a TPU chip: a device file or a Google PCI device."""
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return True
    for device in glob.glob("/sys/bus/pci/devices/*"):
        try:
            with open(os.path.join(device, "vendor")) as f:
                vendor = f.read().strip()
            with open(os.path.join(device, "device")) as f:
                model = f.read().strip()
        except OSError:
            continue
        if vendor == _GOOGLE_PCI_VENDOR and model not in _GOOGLE_NOT_TPU:
            return True
    return False


def _gpu_visible() -> bool:
    """True if an NVIDIA or AMD GPU's device files are present (WSL2's `/dev/dxg` included)."""
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/dxg", "/dev/kfd")) or bool(
        glob.glob("/dev/nvidia[0-9]*")
    )
