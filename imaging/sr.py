"""Super-resolution generator: a small fully convolutional network, run in numpy.

Architecture (identical in :mod:`imaging.train_sr`, which trains it with PyTorch)::

    x (H, W, 3) in [0, 1], minus 0.5
    encoder   e1 = relu(conv3x3(3 -> C))                       H   x W
              e2 = relu(conv3x3 stride 2 (C -> B))             H/2 x W/2
              b  = e2 + sum of R residual blocks (conv, relu, conv) at B channels
    decoder   d  = relu(pixel_shuffle2(conv3x3(B -> 4C)) + e1)  H   x W
              d  = relu(conv3x3(C -> C))(d)
    upsample  y  = pixel_shuffle_s(conv3x3(C -> 3 s^2))(d)      sH  x sW
    output    bicubic_s(x) + y, clipped to [0, 1]

Every layer is a convolution, so any input size works: an odd side is padded by one
replicated row/column for the stride-2 encoder and the output is cropped back to exactly
``(s*H, s*W)``. Inference is im2col + one matrix product per layer (BLAS, float32); a
``cancel`` callable is polled between layers so that a job can be pre-empted promptly
(:mod:`client.srqueue`). The bicubic base (Keys, a = -0.5, edge pixels replicated)
is the same function the benchmark uses as its baseline.

Weights live in ``resources/pathology/sr_x2.npz``, ``sr_x4.npz`` and ``sr_x8.npz``
(float16, about 1 MB each) with a JSON ``meta`` entry (architecture, training data,
held-out scores). They are read from disk only: nothing is ever fetched from a network.
×8 (5× → 40×) is offered — by :func:`offered_scales`, the CLI's ``--sr 8`` and
:func:`load_generator` — only when its weights' meta records a gain over bicubic of at
least :data:`X8_MIN_GAIN_DB` on the held-out slides never trained on (:func:`offer_check`
says why not otherwise).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["Generator", "GeneratorError", "SRCancelled", "bicubic_upscale", "load_generator",
           "offered_scales", "weights_path", "RESOURCES", "upscale_tile"]

RESOURCES = Path(__file__).resolve().parent.parent / "resources" / "pathology"
SCALES = (2, 4, 8)
#: ×8 (5× → 40×) is offered only when its weights beat bicubic by at least this much on
#: the held-out slides never trained on (mean over them, the ``pyramid`` degradation:
#: ``meta["heldout"]["pyramid"]["unseen_mean_gain_db"]``, written by imaging.train_sr)
X8_MIN_GAIN_DB = 1.0


class GeneratorError(RuntimeError):
    """The weights are missing, damaged or do not fit the architecture."""


class SRCancelled(Exception):
    """Inference stopped between two layers because ``cancel()`` said so."""


def weights_path(scale: int, root: Path | None = None) -> Path:
    return Path(root or RESOURCES) / f"sr_x{scale}.npz"


# --------------------------------------------------------------------------- bicubic
def _keys(t: np.ndarray, a: float = -0.5) -> np.ndarray:
    t = np.abs(t)
    return np.where(t <= 1, (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1,
                    np.where(t < 2, a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a, 0.0))


def _bicubic_taps(n: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices (s*n, 4), weights (s*n, 4)) of the 4 input samples of every output
    sample; output o sits at input coordinate (o + 0.5)/s - 0.5; edges replicate."""
    o = np.arange(n * s)
    x = (o + 0.5) / s - 0.5
    x0 = np.floor(x).astype(np.int64)
    idx = x0[:, None] + np.arange(-1, 3)[None, :]
    w = _keys(x[:, None] - idx).astype(np.float32)
    w /= w.sum(axis=1, keepdims=True)
    return np.clip(idx, 0, n - 1), w


def bicubic_upscale(img: np.ndarray, s: int) -> np.ndarray:
    """Bicubic ×s of an (H, W[, C]) float array (separable Keys kernel, a = -0.5)."""
    a = np.asarray(img, np.float32)
    ih, wh = _bicubic_taps(a.shape[0], s)
    rows = np.einsum("ok,ok...->o...", wh, a[ih])
    iw, ww = _bicubic_taps(a.shape[1], s)
    return np.einsum("ok,rok...->ro...", ww, rows[:, iw])


def area_downscale(img: np.ndarray, s: int) -> np.ndarray:
    """Mean of every s×s block (the degradation the generator was trained for; also how
    pyramid levels are made). The image is cropped to a multiple of s."""
    a = np.asarray(img, np.float32)
    h, w = (a.shape[0] // s) * s, (a.shape[1] // s) * s
    a = a[:h, :w]
    return a.reshape(h // s, s, w // s, s, *a.shape[2:]).mean(axis=(1, 3))


# --------------------------------------------------------------------------- layers
def _conv3x3(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int = 1) -> np.ndarray:
    """x (H, W, Cin) float32, w (Cout, Cin, 3, 3), zero padding 1 (as torch).

    Few input channels: one im2col matrix product. Many: nine shifted matrix products
    accumulated (each reads contiguous rows of W·Cin values; about twice as fast)."""
    h, wd, cin = x.shape
    p = np.zeros((h + 2, wd + 2, cin), np.float32)
    p[1:-1, 1:-1] = x
    if cin >= 8:
        oh, ow = (h, wd) if stride == 1 else (-(-h // stride), -(-wd // stride))
        out = np.empty((oh * ow, w.shape[0]), np.float32)
        out[:] = b
        for dy in range(3):
            for dx in range(3):
                sl = p[dy:dy + h:stride, dx:dx + wd:stride]
                out += sl.reshape(-1, cin) @ w[:, :, dy, dx].T
        return out.reshape(oh, ow, w.shape[0])
    win = np.lib.stride_tricks.sliding_window_view(p, (3, 3), axis=(0, 1))  # H, W, Cin, 3, 3
    if stride != 1:
        win = win[::stride, ::stride]
    oh, ow = win.shape[:2]
    cols = win.reshape(oh * ow, cin * 9)
    wm = w.reshape(w.shape[0], cin * 9).T
    out = cols @ wm
    out += b
    return out.reshape(oh, ow, w.shape[0])


def _pixel_shuffle(x: np.ndarray, r: int) -> np.ndarray:
    """(H, W, C*r*r) -> (H*r, W*r, C), torch.nn.PixelShuffle channel order."""
    h, w, c = x.shape
    c //= r * r
    return x.reshape(h, w, c, r, r).transpose(0, 3, 1, 4, 2).reshape(h * r, w * r, c)


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0, out=x)


@dataclass
class Generator:
    """A loaded ×``scale`` generator; call :meth:`upscale`."""

    scale: int
    params: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)
    #: "numpy" or "onnxruntime" (:mod:`imaging.sr_ort`: the same layers, faster kernels)
    backend: str = "numpy"
    _ort: object = field(default=None, repr=False)
    #: SHA-256 (16 hex digits) of the weights file: which generator made a tile
    weights_id: str = ""

    def use_backend(self, backend: str, threads: int | None = None) -> "Generator":
        """Run on ``backend`` ("numpy" or "onnxruntime"); returns self."""
        if backend == "onnxruntime":
            from imaging.sr_ort import OrtNetwork

            self._ort = OrtNetwork(self.params, self.scale, self.n_res, threads)
        elif backend != "numpy":
            raise ValueError(f"unknown super-resolution backend {backend!r}")
        else:
            self._ort = None
        self.backend = backend
        return self

    @property
    def n_res(self) -> int:
        return sum(1 for k in self.params if k.startswith("res") and k.endswith(".a.w"))

    def _c(self, name, x, stride=1):
        return _conv3x3(x, self.params[name + ".w"], self.params[name + ".b"], stride)

    def upscale(self, rgb: np.ndarray, cancel: Callable[[], bool] | None = None, *,
                ensemble: bool = False) -> np.ndarray:
        """uint8 or float (H, W, 3) → uint8 (s*H, s*W, 3). ``cancel`` is polled between
        layers; if it returns True, :class:`SRCancelled` is raised. ``ensemble`` averages
        the eight flips/rotations of the input (8× the time, a little more accurate:
        offered by the headless render, ``--sr-ensemble``; the interactive viewer does
        not use it)."""
        if ensemble:
            x = np.asarray(rgb)
            acc = None
            for k in range(4):
                for flip in (False, True):
                    t = np.rot90(x, k)
                    t = t[:, ::-1] if flip else t
                    y = self._forward(np.ascontiguousarray(t), cancel)
                    y = y[:, ::-1] if flip else y
                    y = np.rot90(y, -k)
                    acc = y if acc is None else acc + y
            return (np.clip(acc / 8.0, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        return (np.clip(self._forward(rgb, cancel), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    def _forward(self, rgb: np.ndarray, cancel: Callable[[], bool] | None) -> np.ndarray:
        """The network on one input: float (s*H, s*W, 3), not clipped."""
        x = np.asarray(rgb)
        if x.ndim != 3 or x.shape[2] != 3 or min(x.shape[:2]) < 1:
            raise ValueError(f"expected an (H, W, 3) image, got shape {x.shape}")
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        h, w = x.shape[:2]
        check = cancel or (lambda: False)
        xp = np.pad(x, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        s = self.scale
        if self._ort is not None:
            y = self._ort(xp, check)
            if y is None:
                raise SRCancelled()
            return bicubic_upscale(xp, s)[: s * h, : s * w] + y[: s * h, : s * w]
        e1 = _relu(self._c("head", xp - 0.5))
        e2 = _relu(self._c("down", e1, stride=2))
        b = e2
        for i in range(self.n_res):
            if check():
                raise SRCancelled()
            t = _relu(self._c(f"res{i}.a", b))
            b = b + self._c(f"res{i}.b", t)
        if check():
            raise SRCancelled()
        d = _relu(_pixel_shuffle(self._c("up", b), 2) + e1)
        d = _relu(self._c("fuse", d))
        if check():
            raise SRCancelled()
        y = _pixel_shuffle(self._c("tail", d), self.scale)
        return bicubic_upscale(xp, s)[: s * h, : s * w] + y[: s * h, : s * w]


_CACHE: dict[tuple[int, str, str], Generator] = {}


def default_backend() -> str:
    """``MEDVIEW_SR_BACKEND`` ("numpy" / "onnxruntime"), else onnxruntime when it is
    installed (faster: bench/sr.py), else numpy."""
    want = os.environ.get("MEDVIEW_SR_BACKEND", "").strip().lower()
    if want in ("numpy", "onnxruntime"):
        return want
    from imaging.sr_ort import available

    return "onnxruntime" if available() else "numpy"


def _read_meta(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(bytes(z["meta"]).decode("utf-8")) if "meta" in z else {}
    except (OSError, ValueError, KeyError) as e:
        raise GeneratorError(f"generator weights {path} are damaged: {e}") from e


def offer_check(scale: int, root: Path | str | None = None) -> str | None:
    """None when ×``scale`` may be offered, else why not (one sentence). ×2 and ×4 need
    their weights; ×8 also needs a held-out gain over bicubic of at least
    :data:`X8_MIN_GAIN_DB` recorded in its weights' meta."""
    if scale not in SCALES:
        return f"super-resolution is available at ×2, ×4 and ×8, not ×{scale}"
    path = weights_path(scale, Path(root) if root else None)
    if not path.is_file():
        return f"no ×{scale} generator weights ({path})"
    if scale == 8:
        gain = (_read_meta(path).get("heldout", {}).get("pyramid", {})
                .get("unseen_mean_gain_db"))
        if gain is None:
            return "the ×8 generator has no held-out score"
        if gain < X8_MIN_GAIN_DB:
            return (f"×8 is not offered: on slides it never saw it beats bicubic by only "
                    f"{gain:+.2f} dB (at least +{X8_MIN_GAIN_DB:.1f} dB needed)")
    return None


def offered_scales(root: Path | str | None = None) -> tuple[int, ...]:
    """The super-resolution factors the viewer and the CLI offer (:func:`offer_check`)."""
    return tuple(s for s in SCALES if offer_check(s, root) is None)


def load_generator(scale: int, root: Path | str | None = None, *,
                   backend: str | None = None, unoffered: bool = False) -> Generator:
    """The ×``scale`` generator from ``resources/pathology`` (or ``root``), cached, on
    ``backend`` (default :func:`default_backend`). A factor that is not offered
    (:func:`offer_check`: ×8 below its held-out bar) raises :class:`GeneratorError`
    unless ``unoffered`` (benchmarks and training scores only)."""
    if scale not in SCALES:
        raise GeneratorError(f"super-resolution is available at ×2, ×4 and ×8, not ×{scale}")
    if scale == 8 and not unoffered:
        why = offer_check(scale, root)
        if why:
            raise GeneratorError(why)
    backend = backend or default_backend()
    path = weights_path(scale, Path(root) if root else None)
    key = (scale, str(path), backend)
    if key in _CACHE:
        return _CACHE[key]
    if not path.is_file():
        raise GeneratorError(f"generator weights not found: {path} (train them with "
                             f"`python -m imaging.train_sr --scale {scale}`)")
    try:
        import hashlib

        weights_id = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode("utf-8")) if "meta" in z else {}
            params = {k: z[k].astype(np.float32) for k in z.files if k != "meta"}
    except (OSError, ValueError, KeyError) as e:
        raise GeneratorError(f"generator weights {path} are damaged: {e}") from e
    need = ("head.w", "down.w", "up.w", "fuse.w", "tail.w")
    missing = [k for k in need if k not in params]
    if missing:
        raise GeneratorError(f"generator weights {path} lack {', '.join(missing)}")
    if params["tail.w"].shape[0] != 3 * scale * scale:
        raise GeneratorError(f"{path} is not a ×{scale} generator "
                             f"(tail has {params['tail.w'].shape[0]} channels)")
    g = Generator(scale, params, meta, weights_id=weights_id).use_backend(backend)
    _CACHE[key] = g
    return g


def upscale_tile(rgb: np.ndarray, scale: int, *, margin: int = 0,
                 cancel: Callable[[], bool] | None = None) -> np.ndarray:
    """Super-resolve an image whose outer ``margin`` pixels are context only (taken from
    the neighbouring tiles so that tiles join without seams); returns the ×scale
    result of the inner part."""
    out = load_generator(scale).upscale(rgb, cancel)
    if margin:
        m = margin * scale
        out = out[m: out.shape[0] - m, m: out.shape[1] - m]
    return out
