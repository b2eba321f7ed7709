"""The super-resolution network on ONNX Runtime (W1: a faster ×4 path on the CPU).

:class:`OrtNetwork` builds, in memory, ONNX graphs of exactly the layers of
:class:`imaging.sr.Generator` (``Conv`` 3×3 pad 1, ``Relu``, ``Add``, ``DepthToSpace``
mode CRD = ``torch.nn.PixelShuffle``) from the same shipped weights — no model file, no
download — and runs them with ONNX Runtime's CPU kernels instead of numpy matrix
products. The network is cut into pieces (encoder, each residual block, decoder, tail)
so that ``cancel()`` is still polled between layers, as on the numpy path; the bicubic
base is added by the caller, unchanged. Results equal the numpy path's to float32
rounding (measured: at most 1 grey level apart after rounding to 8 bits, on a few
pixels; tests/test_pathology_sr.py).

Used when the ``onnxruntime`` package is installed, unless ``MEDVIEW_SR_BACKEND=numpy``
(see :func:`imaging.sr.load_generator`); ``bench/sr.py`` measures both.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np

__all__ = ["OrtNetwork", "available"]


def available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class OrtNetwork:
    """The generator's layers as ONNX Runtime sessions (see the module docstring)."""

    def __init__(self, params: dict[str, np.ndarray], scale: int, n_res: int,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        self.scale = scale
        self.n_res = n_res
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or os.environ.get("MEDVIEW_SR_THREADS", 0) or 0)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # no busy-waiting between kernels: the viewer's decoders share the two cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._p = params

        def session(model) -> "ort.InferenceSession":
            return ort.InferenceSession(model.SerializeToString(), opts,
                                        providers=["CPUExecutionProvider"])

        self.encoder = session(self._graph("encoder", ["x"], ["e1", "e2"], [
            ("conv", "head", "x", "h0"), ("relu", "h0", "e1"),
            ("conv", "down", "e1", "d0", 2), ("relu", "d0", "e2")]))
        self.blocks = [session(self._graph(f"res{i}", ["b"], ["out"], [
            ("conv", f"res{i}.a", "b", "t0"), ("relu", "t0", "t1"),
            ("conv", f"res{i}.b", "t1", "t2"), ("add", "b", "t2", "out")]))
            for i in range(n_res)]
        self.decoder = session(self._graph("decoder", ["b", "e1"], ["d"], [
            ("conv", "up", "b", "u0"), ("shuffle", "u0", "u1", 2), ("add", "u1", "e1", "u2"),
            ("relu", "u2", "u3"), ("conv", "fuse", "u3", "u4"), ("relu", "u4", "d")]))
        self.tail = session(self._graph("tail", ["d"], ["y"], [
            ("conv", "tail", "d", "t0"), ("shuffle", "t0", "y", scale)]))

    def _graph(self, name: str, inputs: list[str], outputs: list[str], ops: list[tuple]):
        from onnx import TensorProto, helper, numpy_helper

        nodes, inits = [], []
        for op in ops:
            kind = op[0]
            if kind == "conv":
                _k, layer, src, dst, *rest = op
                stride = rest[0] if rest else 1
                w = self._p[layer + ".w"].astype(np.float32)
                b = self._p[layer + ".b"].astype(np.float32)
                inits += [numpy_helper.from_array(w, f"{layer}.w"),
                          numpy_helper.from_array(b, f"{layer}.b")]
                nodes.append(helper.make_node("Conv", [src, f"{layer}.w", f"{layer}.b"], [dst],
                                              kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                              strides=[stride, stride]))
            elif kind == "relu":
                nodes.append(helper.make_node("Relu", [op[1]], [op[2]]))
            elif kind == "add":
                nodes.append(helper.make_node("Add", [op[1], op[2]], [op[3]]))
            elif kind == "shuffle":
                nodes.append(helper.make_node("DepthToSpace", [op[1]], [op[2]],
                                              blocksize=op[3], mode="CRD"))
        ins = [helper.make_tensor_value_info(i, TensorProto.FLOAT, [1, None, None, None])
               for i in inputs]
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, None, None, None])
                for o in outputs]
        g = helper.make_graph(nodes, name, ins, outs, inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)],
                                 ir_version=8)

    def __call__(self, xp: np.ndarray, check: Callable[[], bool]) -> np.ndarray:
        """``xp`` (H, W, 3) float32 in [0, 1], H and W even → the residual (sH, sW, 3);
        None when ``check()`` said stop between two layers (the caller raises
        :class:`imaging.sr.SRCancelled`)."""
        x = np.ascontiguousarray((xp - 0.5).transpose(2, 0, 1)[None], np.float32)
        e1, b = self.encoder.run(None, {"x": x})
        for blk in self.blocks:
            if check():
                return None
            (b,) = blk.run(None, {"b": b})
        if check():
            return None
        (d,) = self.decoder.run(None, {"b": b, "e1": e1})
        if check():
            return None
        (y,) = self.tail.run(None, {"d": d})
        return y[0].transpose(1, 2, 0)
