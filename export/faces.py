"""Person evidence for the bundled captioner: MTCNN's face detector (Zhang et al. 2016) as a
fixed-shape cascade that traces into the vision graph, so the runtime needs no code of its own.

The weights are facenet-pytorch 2.6's (MIT, Copyright (c) 2019 Timothy Esler), copied from its
wheel into export/weights/mtcnn.pt: the package itself pins torch < 2.3 and cannot be installed
beside this project. The cascade is MTCNN's, reshaped so that no tensor's size depends on the
image: P-Net over a fixed pyramid of the 224-pixel image, laid side by side in one mosaic so that it
runs once; only local maxima count (in place of a per-scale NMS); the best CANDIDATES boxes go to
R-Net and, after a matrix ("fast") NMS, the best REFINED to O-Net; a last fast NMS leaves distinct
faces. Crops are bilinear samples at the net's input size. Output per image: the FACES strongest
faces as (probability, side / 224), zeros where there are fewer.

Sized to a 2x cost budget for the vision graph (measured, 2 cores, interleaved: the graph before faces
6.0-6.9 ms per image, this one 11.5-13.8 ms, 1.90-1.99x in two runs; 3.6x at first): one P-Net pass
over a packed mosaic instead of one per scale, the smaller scales resized from the largest, PReLU in
ops ONNX Runtime runs fast, grid_sample crops of all boxes at once instead of a copy of the image per
box, 16 and 4 boxes for the later stages, and faces from 24 pixels (a tenth of the image's side) up.
"""

import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .concepts import FACES
from .encoder import IMAGE_SIZE

WEIGHTS = Path(__file__).parent / "weights" / "mtcnn.pt"
MIN_FACE = 24  # pixels of the 224-pixel image: the smallest face looked for
SCALE_FACTOR = 0.709  # MTCNN's pyramid step
THRESHOLDS = (0.6, 0.7, 0.7)  # P-Net, R-Net, O-Net, as facenet-pytorch's defaults
CANDIDATES, REFINED = 16, 4


def pyramid(size: int = IMAGE_SIZE) -> list[float]:
    """Scales at which P-Net's 12-pixel window sees faces from MIN_FACE pixels up to the whole image."""
    scales, scale = [], 12 / MIN_FACE
    while size * scale >= 12:
        scales.append(scale)
        scale *= SCALE_FACTOR
    return scales


class PReLU(nn.PReLU):
    """PReLU as relu(x) - a * relu(-x): the same numbers, but ONNX Runtime fuses the first Relu
    into its convolution and runs the rest as plain elementwise ops, where its PRelu kernel over a
    (C, 1, 1) slope is slow (O-Net alone: 10.1 -> 1.6 ms for 4 crops, P-Net 12.3 -> 8.6 ms, 2 cores)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.weight.reshape(-1, *[1] * (x.dim() - 2))
        return F.relu(x) - a * F.relu(-x)


def conv_stack(spec: list[tuple[int, int, int, int]]) -> nn.Sequential:
    """(in, out, kernel, pool kernel or 0) per layer -> conv, PReLU[, max pool]; attribute names as
    facenet-pytorch's (conv1, prelu1, ...) so its state dicts load unchanged."""
    layers = []
    for i, (cin, cout, k, pool) in enumerate(spec, 1):
        layers += [(f"conv{i}", nn.Conv2d(cin, cout, k)), (f"prelu{i}", PReLU(cout))]
        if pool:
            layers.append((f"pool{i}", nn.MaxPool2d(pool, 2, ceil_mode=True)))
    return nn.Sequential(OrderedDict(layers))


class Stage(nn.Module):
    """One net of the cascade: convolutions (`body`), then a face probability and box offsets."""

    heads: dict[str, str]  # facenet-pytorch's names of the layers after the body -> ours

    def load(self, state: dict) -> None:
        """facenet-pytorch's state dict: its heads renamed, its conv/PReLU layers under `body`;
        O-Net's landmark layer (dense6_3) is left out, unused here."""
        renamed = {}
        for key, value in state.items():
            head, _, rest = key.partition(".")
            if head in self.heads:
                renamed[f"{self.heads[head]}.{rest}"] = value
            elif head.startswith(("conv", "prelu")):
                renamed[f"body.{key}"] = value
        self.load_state_dict(renamed)


class PNet(Stage):
    """Fully convolutional: a probability and offsets per 12-pixel window, stride 2."""

    heads = {"conv4_1": "prob", "conv4_2": "box"}

    def __init__(self):
        super().__init__()
        self.body = conv_stack([(3, 10, 3, 2), (10, 16, 3, 0), (16, 32, 3, 0)])
        self.prob, self.box = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = self.body(x)
        return self.box(x), self.prob(x).softmax(dim=1)[:, 1]


class DenseNet(Stage):
    """R-Net and O-Net: convolutions and one dense layer over a fixed-size crop."""

    def __init__(self, convs, features: int, width: int):
        super().__init__()
        self.body = conv_stack(convs)
        self.dense, self.prelu = nn.Linear(features, width), PReLU(width)
        self.prob, self.box = nn.Linear(width, 2), nn.Linear(width, 4)
        n = len(convs) + 1
        self.heads = {f"dense{n}": "dense", f"prelu{n}": "prelu", f"dense{n + 1}_1": "prob", f"dense{n + 1}_2": "box"}

    def forward(self, x):
        x = self.body(x).permute(0, 3, 2, 1).flatten(1)  # facenet's (Caffe's) flattening order
        x = self.prelu(self.dense(x))
        return self.box(x), self.prob(x).softmax(dim=1)[:, 1]


def even(n: int) -> int:
    """n rounded up to P-Net's stride: where the next scaled image in the mosaic may start."""
    return n + n % 2


def shelves(sides: list[int]) -> list[list[int]]:
    """Scaled images (largest first, by side) into columns as tall as the largest: each goes below
    the images of the first column with room for it (at an even row), else starts a new column."""
    columns, used = [], []
    for i, side in enumerate(sides):
        column = next((k for k, rows in enumerate(used) if rows + side <= sides[0]), len(columns))
        if column == len(columns):
            columns.append([])
            used.append(0)
        columns[column].append(i)
        used[column] += even(side)
    return columns


def square(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) x1 y1 x2 y2 -> the square of the longer side about the same centre (MTCNN's rerec)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    side = torch.maximum(x2 - x1, y2 - y1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return torch.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dim=-1)


def regress(boxes: torch.Tensor, offsets: torch.Tensor, extra: float = 1.0) -> torch.Tensor:
    """Box regression as MTCNN's bbreg: offsets in units of the box's size (+1 pixel after P-Net)."""
    w = boxes[..., 2] - boxes[..., 0] + extra
    h = boxes[..., 3] - boxes[..., 1] + extra
    return boxes + offsets * torch.stack([w, h, w, h], dim=-1)


def crops(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """image (B, 3, H, W) on 0..255, boxes (B, K, 4) in pixels -> (B*K, 3, size, size) normalised
    as MTCNN wants; outside the image reads as black, as facenet-pytorch's padding. One bilinear
    sample per output pixel, all of an image's boxes in one grid (no copy of the image per box)."""
    b, k, _ = boxes.shape
    h, w = image.shape[2:]
    steps = (torch.arange(size, dtype=image.dtype) + 0.5) / size
    x1, y1, x2, y2 = (t[..., None] for t in boxes.unbind(-1))
    xs = (x1 + steps * (x2 - x1)) / w * 2 - 1  # (B, K, size), grid_sample's [-1, 1]
    ys = (y1 + steps * (y2 - y1)) / h * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(xs[:, :, None, :], ys[:, :, :, None]), dim=-1)
    sampled = F.grid_sample(image, grid.reshape(b, k * size, size, 2), mode="bilinear", padding_mode="zeros",
                            align_corners=False)
    sampled = sampled.reshape(b, 3, k, size, size).transpose(1, 2).reshape(b * k, 3, size, size)
    return (sampled - 127.5) * 0.0078125


def fast_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, by_min: bool = False) -> torch.Tensor:
    """Scores with suppressed boxes zeroed, boxes (B, K, 4) sorted by score: a box goes when any
    better-scored box overlaps it by more than threshold (intersection over union, or over the
    smaller box). Matrix NMS (YOLACT's Fast NMS): no loop, at most a little stricter than greedy."""
    x1, y1, x2, y2 = (t[..., :, None] for t in boxes.unbind(-1))
    area = ((x2 - x1 + 1) * (y2 - y1 + 1))
    iw = (torch.minimum(x2, x2.mT) - torch.maximum(x1, x1.mT) + 1).clamp_min(0)
    ih = (torch.minimum(y2, y2.mT) - torch.maximum(y1, y1.mT) + 1).clamp_min(0)
    inter = iw * ih
    union = torch.minimum(area, area.mT) if by_min else area + area.mT - inter
    # [i, j] for i scored better than j; the mask a constant, not a Trilu op (TensorRT 8.6 lacks it)
    overlap = inter / union * torch.ones(boxes.shape[1], boxes.shape[1]).triu(diagonal=1)
    live = (scores > 0).to(scores.dtype)[..., :, None]
    suppressed = (overlap * live).amax(dim=-2) > threshold
    return torch.where(suppressed, torch.zeros_like(scores), scores)


def best(boxes: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores, order = scores.topk(k, dim=1)
    return boxes.gather(1, order[..., None].expand(-1, -1, 4)), scores


class FaceDetector(nn.Module):
    """pixels (B, 3, 224, 224) normalised as (x - 127) / 128 -> faces (B, FACES, 2): probability and
    side / 224 of the strongest distinct faces, strongest first."""

    def __init__(self):
        super().__init__()
        self.pnet = PNet()
        self.rnet = DenseNet([(3, 28, 3, 3), (28, 48, 3, 3), (48, 64, 2, 0)], 576, 128)
        self.onet = DenseNet([(3, 32, 3, 3), (32, 64, 3, 3), (64, 64, 3, 2), (64, 128, 2, 0)], 1152, 256)
        # The pyramid as one mosaic, so that P-Net runs once: columns as wide as their largest scaled
        # image, the smaller ones stacked below a larger where they fit, each at an even row and
        # column (P-Net's stride). The windows that lie inside one scaled image are kept, the rest
        # masked. Stacking took the mosaic from 113 x 360 to 113 x 274 pixels.
        scales = pyramid()
        self.sides = [int(IMAGE_SIZE * scale + 1) for scale in scales]
        self.columns = shelves(self.sides)
        corners, width = {}, 0
        for column in self.columns:
            top = 0
            for i in column:
                corners[i] = top, width
                top += even(self.sides[i])
            width += even(self.sides[column[0]])
        rows, cols = self.cells(self.sides[0]), self.cells(width)
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        valid, windows = torch.zeros(rows, cols, dtype=torch.bool), torch.zeros(rows, cols, 4)
        for i, (scale, side) in enumerate(zip(scales, self.sides)):
            top, left = corners[i]
            inside = (2 * c >= left) & (2 * c + 12 <= left + side) & (2 * r >= top) & (2 * r + 12 <= top + side)
            x, y = 2 * c - left, 2 * r - top
            box = torch.stack([((x + 1) / scale).floor(), ((y + 1) / scale).floor(),
                               ((x + 12) / scale).floor(), ((y + 12) / scale).floor()], dim=-1)
            valid |= inside
            windows[inside] = box[inside]
        self.register_buffer("valid", valid.float(), persistent=False)
        self.register_buffer("window_cells", valid.flatten().nonzero()[:, 0], persistent=False)
        self.register_buffer("windows", windows.reshape(-1, 4)[self.window_cells], persistent=False)
        # Per scale, the matrix of an antialiased bilinear resize (torch's, applied to the identity): two
        # MatMuls per scale, where TensorRT's Resize has no antialiasing. The first scale is resized
        # from the image, the others from the first (a (side, sides[0]) matrix, not (side, 224)): 56%
        # of the multiply-adds of resizing each from the image.
        for i, side in enumerate(self.sides):
            source = IMAGE_SIZE if i == 0 else self.sides[0]
            eye = torch.eye(source)[None, None]
            resize = F.interpolate(eye, size=(side, source), mode="bilinear", align_corners=False, antialias=True)
            self.register_buffer(f"resize{i}", resize[0, 0], persistent=False)

    @property
    def resizes(self) -> list[torch.Tensor]:
        return [getattr(self, f"resize{i}") for i in range(len(self.sides))]

    @staticmethod
    def cells(side: int) -> int:
        return math.ceil((side - 2) / 2) - 4  # P-Net: conv 3, max pool 2 (ceil), conv 3, conv 3

    def load(self, path: Path = WEIGHTS) -> "FaceDetector":
        state = torch.load(path, map_location="cpu", weights_only=True)
        for name in ("pnet", "rnet", "onet"):
            getattr(self, name).load(state[name])
        return self.eval()

    def proposals(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """P-Net over the pyramid: (B, N, 4) squared boxes and (B, N) scores, zero below threshold
        and where a window is not the best of its 3x3 neighbours."""
        height, (first, *rest) = self.sides[0], self.resizes
        largest = first @ image @ first.mT
        levels = [largest] + [resize @ largest @ resize.mT for resize in rest]
        columns = []
        for column in self.columns:  # as __init__ laid them out: each image padded to its successor's row
            width, sides = even(self.sides[column[0]]), [self.sides[i] for i in column]
            below = [even(side) - side for side in sides[:-1]] + [height - sum(map(even, sides[:-1])) - sides[-1]]
            columns.append(torch.cat([F.pad(levels[i], (0, width - side, 0, pad))
                                      for i, side, pad in zip(column, sides, below)], dim=2))
        canvas = torch.cat(columns, dim=3)
        offsets, prob = self.pnet((canvas - 127.5) * 0.0078125)
        prob = prob * self.valid
        keep = (prob == F.max_pool2d(prob, 3, stride=1, padding=1)) & (prob >= THRESHOLDS[0])
        scores = torch.where(keep, prob, torch.zeros_like(prob)).flatten(1)[:, self.window_cells]
        offsets = offsets.flatten(2)[:, :, self.window_cells].mT
        return square(regress(self.windows, offsets, extra=0.0)), scores

    def refine(self, net: DenseNet, image, boxes, scores, size: int, threshold: float):
        """One later stage: the net's probability (zero below threshold or where the earlier stage
        had none) and its regressed boxes."""
        offsets, prob = net(crops(image, boxes, size))
        prob = prob.reshape(scores.shape)
        prob = torch.where((prob >= threshold) & (scores > 0), prob, torch.zeros_like(prob))
        return regress(boxes, offsets.reshape(boxes.shape)), prob

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        image = pixels * 128 + 127  # back to 0..255, from EfficientNet-Lite's normalisation
        boxes, scores = best(*self.proposals(image), CANDIDATES)
        boxes, scores = self.refine(self.rnet, image, boxes, scores, 24, THRESHOLDS[1])
        boxes, scores = best(square(boxes), scores, CANDIDATES)
        boxes, scores = best(boxes, fast_nms(boxes, scores, 0.7), REFINED)
        boxes, scores = self.refine(self.onet, image, boxes, scores, 48, THRESHOLDS[2])
        boxes, scores = best(boxes, scores, REFINED)
        boxes, scores = best(boxes, fast_nms(boxes, scores, 0.7, by_min=True), FACES)
        side = ((boxes[..., 2] - boxes[..., 0]).clamp_min(0) * (boxes[..., 3] - boxes[..., 1]).clamp_min(0)).sqrt()
        return torch.stack([scores, torch.where(scores > 0, side / IMAGE_SIZE, torch.zeros_like(side))], dim=-1)
