"""IRN's first stage (Ahn et al., CVPR 2019, jiwoon-ahn/irn): a multi-label classification network whose 1x1
classifier, applied before the global average pooling, gives class activation maps. ResNet-50 (torchvision layout,
output stride 16); the stem and the first two stages do not train; normalisation layers stay in evaluation mode (IRN's
``train()`` never switches them); multi-label soft-margin loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FROZEN = ("conv1", "bn1", "layer1", "layer2")  # IRN: conv1/bn1 without gradient, stage 2's output detached


class CAMNet(nn.Module):
    def __init__(self, body: nn.Module, n_classes: int):
        super().__init__()
        self.body = body
        self.classifier = nn.Conv2d(body.out_channels, n_classes, 1, bias=False)
        for name in FROZEN:
            module = getattr(body, name, None)
            if module is not None:
                module.requires_grad_(False)

    def train(self, mode: bool = True) -> "CAMNet":
        """Normalisation statistics are ImageNet's throughout (IRN keeps the network in evaluation mode)."""
        return super().train(False)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)[self.body.out_feature]

    def forward(self, x: Tensor) -> Tensor:
        """Image logits (B, K): the classifier on the globally average-pooled features."""
        return self.classifier(self.features(x).mean((2, 3), keepdim=True)).flatten(1)

    def cams(self, x: Tensor) -> Tensor:
        """Class activation maps (B, K, h, w): ReLU of the classifier on every feature cell."""
        return F.relu(F.conv2d(self.features(x), self.classifier.weight))

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """IRN: the backbone at lr, the classifier at 10 x lr, weight decay on both."""
        body = [p for p in self.body.parameters() if p.requires_grad]
        return [{"params": body, "lr": lr, "weight_decay": weight_decay},
                {"params": list(self.classifier.parameters()), "lr": 10 * lr, "weight_decay": weight_decay}]


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    return F.multilabel_soft_margin_loss(logits, labels.float())


def poly_lr(base: float, step: int, max_step: int, power: float = 0.9) -> float:
    """IRN's PolyOptimizer: ``base * (1 - step / max_step) ** 0.9`` before update ``step`` (0-based); after
    ``max_step`` updates the last value stays."""
    return base * (1 - min(step, max_step - 1) / max_step) ** power


@torch.no_grad()
def multiscale_cams(net: CAMNet, image: Tensor, classes: Tensor, scales=(1.0, 0.5, 1.5, 2.0)) -> Tensor:
    """IRN's ``make_cam`` for one normalised image (3, H, W): at every scale the CAMs of the image and of its mirror
    (mirrored back) are added, upsampled to the size rounded up to a multiple of 16 and cropped to (H, W); the scales
    are summed, the ``classes`` present (indices into the K maps) kept, and each map divided by its maximum + 1e-5.
    Returns (len(classes), H, W) in [0, 1)."""
    h, w = image.shape[-2:]
    up = (-(-h // 16) * 16, -(-w // 16) * 16)
    total = None
    for s in scales:
        x = image[None] if s == 1 else F.interpolate(image[None], scale_factor=s, mode="bicubic",
                                                     align_corners=False)
        pair = net.cams(torch.cat([x, x.flip(-1)]))
        cam = pair[0] + pair[1].flip(-1)
        cam = F.interpolate(cam[None], size=up, mode="bilinear", align_corners=False)[0, :, :h, :w]
        total = cam if total is None else total + cam
    total = total[classes]
    return total / (total.flatten(1).amax(1)[:, None, None] + 1e-5)
