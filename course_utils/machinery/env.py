"""Seeds, device, offline status and the one-line environment report used by every notebook."""

from __future__ import annotations

import importlib.metadata
import os
import random
import socket
import sys
import threading

import numpy as np
import torch

#: Packages named in the environment report, in the order a learner cares about them.
REPORTED_PACKAGES = ("torch", "transformer_lens", "sae_lens", "plotly", "ipywidgets")


def set_seed(seed: int = 0) -> None:
    """Seed Python, NumPy and torch so a CPU run is repeatable bit for bit."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"set_seed needs a non-negative int, got {seed!r}.")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(prefer_gpu: bool = False) -> torch.device:
    """The CPU, unless the learner opts in to a GPU with ``COURSE_DEVICE=cuda`` (or ``prefer_gpu``).

    The CPU is the default even where a GPU is present (a Colab GPU runtime, say): every number in
    the solution notebooks was measured on the CPU, and a GPU's float results differ from it.
    """
    forced = os.environ.get("COURSE_DEVICE")
    if forced:
        try:
            return torch.device(forced)
        except RuntimeError:
            raise ValueError(
                f"COURSE_DEVICE={forced!r} is not a torch device; use 'cpu' or 'cuda'."
            ) from None
    if prefer_gpu and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def in_colab() -> bool:
    return "google.colab" in sys.modules


def headless() -> bool:
    """True when no notebook front end will draw widgets (nbval, ``course check``, scripts)."""
    if os.environ.get("COURSE_HEADLESS") == "1":
        return True
    try:
        from IPython import get_ipython
    except ImportError:
        return True
    shell = get_ipython()
    return shell is None or type(shell).__name__ != "ZMQInteractiveShell"


def text_progress_bars() -> None:
    """Make ``tqdm.auto`` draw plain-text bars in this process.

    In a headless run (``course execute``, nbval, ``course check``) nobody draws widgets, so a
    widget bar is saved as its first frame ("0/400") and the solution notebook shows a frozen,
    misleading bar. A text bar is saved with its final state instead.
    """
    import tqdm.auto
    import tqdm.autonotebook
    import tqdm.std

    for module in (tqdm.auto, tqdm.autonotebook):
        module.tqdm, module.trange = tqdm.std.tqdm, tqdm.std.trange


def offline_forced() -> bool:
    """True when the environment asks libraries not to touch the network."""
    names = ("HF_HUB_OFFLINE", "COURSE_OFFLINE", "COURSE_BLOCK_NETWORK")
    return any(os.environ.get(v) == "1" for v in names)


def network_available(host: str = "huggingface.co", port: int = 443, timeout: float = 2.0) -> bool:
    """One bounded connection attempt (no retries): can we reach ``host``?

    Returns False at once when HF_HUB_OFFLINE=1 or COURSE_OFFLINE=1 is set. The attempt runs in a
    daemon thread so that a hanging DNS lookup cannot stall a notebook for longer than ``timeout``.
    """
    if offline_forced():
        return False
    result: list[bool] = [False]

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result[0] = True
        except OSError:
            result[0] = False

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return result[0]


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def env_report() -> str:
    """One line: Python, the key package versions, the device and whether we run offline."""
    from course_utils import __version__

    device = get_device()
    device_text = f"{device.type} ({torch.get_num_threads()} threads)"
    if device.type == "cuda":
        device_text = f"cuda ({torch.cuda.get_device_name(0)})"
    elif torch.cuda.is_available():
        device_text += ", GPU unused (COURSE_DEVICE=cuda opts in)"
    versions = " · ".join(f"{p} {package_version(p)}" for p in REPORTED_PACKAGES)
    mode = (
        "offline mode on" if offline_forced() else "offline mode off (online extras may download)"
    )
    py = ".".join(map(str, sys.version_info[:3]))
    return f"course_utils {__version__} · Python {py} · {versions} · {device_text} · {mode}"


def configure_plotly() -> str:
    """Store figures as plotly JSON (small notebooks, no plotly.js embedded); Colab needs HTML."""
    import plotly.io as pio

    pio.renderers.default = "colab" if in_colab() else "plotly_mimetype"
    return pio.renderers.default


def setup_notebook(seed: int = 0) -> None:
    """Seed everything, configure plotly, and print the one-line environment report."""
    import warnings

    # TransformerLens 3.x announces its successor API on every HookedTransformer. The course uses
    # HookedTransformer on purpose (SAELens splices into it), so the notice is noise for learners.
    warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")
    warnings.filterwarnings("ignore", message=".*TransformerBridge.*")
    set_seed(seed)
    configure_plotly()
    print(env_report())


class NetworkBlockedError(OSError):
    pass


_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0", ""}


def _is_local(host: object) -> bool:
    text = str(host)
    return text in _LOCAL_HOSTS or text.startswith("127.") or text.startswith("/")


def block_network() -> None:
    """Refuse every non-loopback connection and DNS lookup in this process (tests, nbval).

    Jupyter kernels talk to their front end over loopback, so notebooks still run; anything that
    tries to reach the internet fails at once with an error that says why.
    """
    if getattr(socket, "_course_blocked", False):
        return
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def refuse(target: object) -> NetworkBlockedError:
        return NetworkBlockedError(
            f"network access to {target!r} is blocked (COURSE_BLOCK_NETWORK=1): the course's "
            "default path must run offline. Unset COURSE_BLOCK_NETWORK to use the online extras."
        )

    def connect(self: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(host):
            raise refuse(address)
        return real_connect(self, address)

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> list:
        if host is not None and not _is_local(host):
            raise refuse(host)
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
    socket._course_blocked = True  # type: ignore[attr-defined]
