"""CUDA autocast's op policy, emulated on a CPU build (where ``torch.autocast("cuda")`` disables itself
and CPU autocast differs: on CUDA ``layer_norm`` and ``softmax`` run in fp32, on CPU in bf16).

``CudaAutocastPolicy()`` as a context manager casts the floating-point tensor inputs of the ops that
CUDA autocast runs in bf16 (linear, matmul, conv, attention) to bf16, and those it runs in fp32
(layer/group norm, softmax, log-softmax, norms) to fp32, like ``torch.autocast("cuda", torch.bfloat16)``.
It records the dtypes each op saw (``seen``) so a test can assert on them.
"""
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

LOW_PRECISION = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm,
                 torch.addmm, torch.baddbmm, F.conv2d, F.scaled_dot_product_attention}
FP32 = {F.layer_norm, F.group_norm, torch.softmax, torch.Tensor.softmax, F.softmax, F.log_softmax,
        torch.linalg.vector_norm, torch.norm}


def _cast(obj, dtype):
    if isinstance(obj, torch.Tensor) and obj.is_floating_point():
        return obj.to(dtype)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(v, dtype) for v in obj)
    return obj


class CudaAutocastPolicy(TorchFunctionMode):
    def __init__(self, low=torch.bfloat16):
        super().__init__()
        self.low, self.seen = low, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in LOW_PRECISION:
            args, kwargs = _cast(args, self.low), {k: _cast(v, self.low) for k, v in kwargs.items()}
        elif func in FP32:
            args, kwargs = _cast(args, torch.float32), {k: _cast(v, torch.float32) for k, v in kwargs.items()}
        if func in LOW_PRECISION or func in FP32:
            self.seen.append((getattr(func, "__name__", str(func)),
                              tuple(a.dtype for a in args if isinstance(a, torch.Tensor))))
        return func(*args, **kwargs)
