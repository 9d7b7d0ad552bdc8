"""Chapter 10: compressing visual tokens for mobile vision-language models (MobileVLM's projectors).

A LLaVA-style VLM (Liu et al. 2023) is a vision encoder, a *projector* that maps the encoder's patch
features into the language model's embedding space, and a language model that reads the projected
features as ordinary tokens in front of the question. The LM's prefill cost grows with the number of
visual tokens, which is what a phone cannot afford; MobileVLM (Chu et al. 2023, 2024) replaces LLaVA's
two-layer MLP (576 tokens for CLIP ViT-L/14-336) with a lightweight downsample projector (LDP) that
outputs a quarter as many (144), and MobileVLM V2's LDPv2 does it with an MLP, 2x2 average pooling and
a positional-encoding generator (PEG, Chu et al. 2021, "Twins"/"CPVT").

This module, read top to bottom:

1. a synthetic visual world that needs spatial detail (:func:`make_shapes_dataset`, :func:`shapes_splits`);
2. a word-level tokenizer with an image placeholder token (:func:`shapes_tokenizer`);
3. the projectors: :class:`MLPProjector`, :class:`PoolProjector`, :class:`LDP`, :class:`LDPv2`,
   :class:`QueryProjector` (a one-layer resampler / Q-Former-style connector with learned queries), each
   mapping ``(B, N, d_vision)`` to ``(B, M, d_text)``;
4. the VLM: transformers' own ``LlavaForConditionalGeneration`` built from configs, with our projector
   assigned to ``model.model.multi_modal_projector`` (:func:`build_tiny_vlm`) and the image-token count
   handled explicitly (:func:`count_visual_tokens`, :func:`vlm_inputs`);
5. training (:func:`pretrain_vision_encoder`, :func:`train_vlm`, :func:`train_vlms_jointly`) and evaluation
   (:func:`answer`, :func:`evaluate_vlm`, :func:`paired_comparison`), cost (:func:`projector_flops`, :func:`prefill_flops` with :func:`attention_flops`, :func:`prefill_latency`);
6. the two zoo entries: ``shapes-vit`` (the vision encoder, pre-trained on the scenes) and ``shapes-vlm``
   (one VLM per projector on the frozen encoder, trained together around one shared LM at an equal
   budget: :func:`train_vlms_jointly`); :func:`position_probe` asks how much position survives a projector.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from companion import zoo
from companion.runtime import median_seconds
from companion.checks import (check_choice, check_directory, check_int, check_module, check_positive_float,
                              check_tensor, check_texts)
from companion.runtime import seed_everything

# ---------------------------------------------------------------------------------------------
# 1. The visual world: coloured shapes on a grid
# ---------------------------------------------------------------------------------------------

COLOURS = ("red", "green", "blue", "yellow")
RGB = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("square", "cross", "triangle")
COUNT_WORDS = ("one", "two", "three")
COLUMN_WORDS = ("1", "2", "3", "4")
#: The question types, in the order the chapter reports them.
QUESTION_TYPES = ("colour", "shape", "count", "column", "left")


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    row: int
    col: int


@dataclass(frozen=True)
class Question:
    scene: int  # index into the dataset's scenes and images
    kind: str  # one of QUESTION_TYPES
    text: str
    answer: str


@dataclass
class ShapesDataset:
    """Scenes, their images (``uint8``, ``[n, size, size, 3]``), per-cell content labels (``[n, grid, grid]``,
    0 = empty, else ``1 + colour * len(SHAPES) + shape``), captions and questions (every applicable type
    for every scene)."""

    images: np.ndarray
    cells: np.ndarray
    scenes: list
    captions: list
    questions: list
    grid: int
    seed: int

    def __len__(self) -> int:
        return len(self.scenes)

    def pixels(self, index=None) -> torch.Tensor:
        """Images as float tensors ``[n, 3, size, size]`` in [0, 1] (what the vision encoder reads)."""
        images = self.images if index is None else self.images[np.asarray(index)]
        return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)

    def of_kind(self, kind: str) -> list:
        check_choice("kind", kind, QUESTION_TYPES)
        return [q for q in self.questions if q.kind == kind]


def _draw(canvas: np.ndarray, obj: ShapeObject, cell: int, rng: np.random.Generator) -> None:
    """Draw one shape into its cell: a side of ``cell - 2`` pixels, jittered by one pixel."""
    size = cell - 2
    top = obj.row * cell + 1 + int(rng.integers(-1, 2) if cell >= 8 else 0)
    left = obj.col * cell + 1 + int(rng.integers(-1, 2) if cell >= 8 else 0)
    top, left = max(top, obj.row * cell), max(left, obj.col * cell)
    yy, xx = np.mgrid[0:size, 0:size]
    if obj.shape == "square":
        mask = np.ones((size, size), bool)
    elif obj.shape == "cross":  # a plus sign with arms two pixels wide
        lo, hi = size // 2 - 1, size // 2 + 1
        mask = ((yy >= lo) & (yy < hi)) | ((xx >= lo) & (xx < hi))
    else:  # an upward triangle: row r is filled over a width growing with r
        half = (yy + 1) * (size / 2) / size
        mask = np.abs(xx - (size - 1) / 2) <= half
    colour = np.clip(np.array(RGB[obj.colour]) + rng.integers(-25, 26, size=3), 0, 255)
    region = canvas[top:top + size, left:left + size]
    region[mask[:region.shape[0], :region.shape[1]]] = colour


def _questions(index: int, objects: list, rng: np.random.Generator) -> list:
    """One question of each applicable type about a scene (colours and shapes are unique within a scene)."""
    out = []
    obj = objects[int(rng.integers(len(objects)))]
    out.append(Question(index, "colour", f"what colour is the {obj.shape}", obj.colour))
    obj = objects[int(rng.integers(len(objects)))]
    out.append(Question(index, "shape", f"what shape is the object coloured {obj.colour}", obj.shape))
    out.append(Question(index, "count", "how many objects are there", COUNT_WORDS[len(objects) - 1]))
    obj = objects[int(rng.integers(len(objects)))]
    out.append(Question(index, "column", f"which column has the {obj.colour} {obj.shape}",
                        COLUMN_WORDS[obj.col]))
    pairs = [(a, b) for a in objects for b in objects if a is not b and a.col != b.col]
    if pairs:
        a, b = pairs[int(rng.integers(len(pairs)))]
        out.append(Question(index, "left", f"is the {a.colour} {a.shape} left of the {b.colour} {b.shape}",
                            "yes" if a.col < b.col else "no"))
    return out


def make_shapes_dataset(n_scenes: int, seed: int = 0, grid: int = 4, cell: int = 8,
                        max_objects: int = 3) -> ShapesDataset:
    """``n_scenes`` seeded scenes of 1..``max_objects`` coloured shapes, each in its own cell of a
    ``grid`` x ``grid`` board of ``cell``-pixel cells (images of ``grid * cell`` pixels a side).

    Colours and shapes are distinct within a scene, so "the red object" and "the square" name one object.
    Every scene gets a caption and one question of each applicable type: colour, shape, count, column
    (1-4, left to right) and left ("is the red square left of the blue cross", only when two objects
    are in different columns). Spatial questions need an object's position, which a VLM can get from its
    visual tokens (what a projector keeps or loses) or from the LM's own position encoding of the token
    order. Each shape is drawn inside its own ``cell``-pixel square, so with 4-pixel patches and 8-pixel
    cells a 2x2 pooling window is exactly one board cell: pooling never mixes two objects here.
    """
    n_scenes = check_int("n_scenes", n_scenes, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    grid = check_int("grid", grid, minimum=2, maximum=16)
    cell = check_int("cell", cell, minimum=4, maximum=32)
    max_objects = check_int("max_objects", max_objects, minimum=1, maximum=min(len(COLOURS), len(SHAPES)))
    if max_objects > grid * grid:
        raise ValueError(f"max_objects ({max_objects}) must be <= grid * grid ({grid * grid})")
    rng = np.random.default_rng(seed)
    size = grid * cell
    images = np.zeros((n_scenes, size, size, 3), np.uint8)
    cells = np.zeros((n_scenes, grid, grid), np.int64)
    scenes, captions, questions = [], [], []
    for i in range(n_scenes):
        k = int(rng.integers(1, max_objects + 1))
        where = rng.choice(grid * grid, size=k, replace=False)
        colours = rng.choice(len(COLOURS), size=k, replace=False)
        shapes = rng.choice(len(SHAPES), size=k, replace=False)
        objects = [ShapeObject(COLOURS[c], SHAPES[s], int(w) // grid, int(w) % grid)
                   for w, c, s in zip(where, colours, shapes)]
        images[i] = rng.integers(0, 30, size=(size, size, 3))  # a dark, noisy background
        for obj, c, s in zip(objects, colours, shapes):
            _draw(images[i], obj, cell, rng)
            cells[i, obj.row, obj.col] = 1 + int(c) * len(SHAPES) + int(s)
        scenes.append(tuple(objects))
        captions.append(" and ".join(f"a {o.colour} {o.shape} in row {o.row + 1} column {o.col + 1}"
                                     for o in sorted(objects, key=lambda o: (o.row, o.col))))
        questions += _questions(i, objects, rng)
    return ShapesDataset(images, cells, scenes, captions, questions, grid, seed)


@dataclass(frozen=True)
class ShapesSplits:
    train: ShapesDataset
    val: ShapesDataset
    test: ShapesDataset


def shapes_splits(n_train: int = 8000, n_val: int = 500, n_test: int = 1000, seed: int = 0) -> ShapesSplits:
    """Disjoint train / validation / test worlds, each from its own seed (``seed``, ``seed + 1``,
    ``seed + 2``): no test scene is seen in training or model selection."""
    check_int("n_train", n_train, minimum=1)
    check_int("n_val", n_val, minimum=1)
    check_int("n_test", n_test, minimum=1)
    check_int("seed", seed, minimum=0)
    return ShapesSplits(make_shapes_dataset(n_train, 3 * seed), make_shapes_dataset(n_val, 3 * seed + 1),
                        make_shapes_dataset(n_test, 3 * seed + 2))


# ---------------------------------------------------------------------------------------------
# 2. A word-level tokenizer with an image placeholder
# ---------------------------------------------------------------------------------------------

IMAGE_TOKEN = "<image>"
_SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>", IMAGE_TOKEN)
_WORDS = ("what", "colour", "is", "the", "shape", "object", "how", "many", "objects", "are", "there",
          "which", "column", "has", "coloured", "in", "left", "of", "a", "and", "row", "yes", "no",
          *COLOURS, *SHAPES, *COUNT_WORDS, *COLUMN_WORDS)


def shapes_tokenizer():
    """A Hugging Face fast tokenizer over the world's words (whitespace-split), with ``<image>`` as a
    special token: like LLaVA's processor, the caller expands it to as many copies as the projector
    outputs visual tokens (:func:`vlm_inputs`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(dict.fromkeys((*_SPECIALS, *_WORDS)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<bos>", eos_token="<eos>",
                                  additional_special_tokens=[IMAGE_TOKEN])
    return tok


# ---------------------------------------------------------------------------------------------
# 3. Projectors: (B, N, d_vision) -> (B, M, d_text)
# ---------------------------------------------------------------------------------------------


def grid_side(n_tokens: int, factor: int = 1) -> int:
    """The side of the square token grid of ``n_tokens`` patches; an error naming both numbers when the
    tokens do not form a square grid or its side is not divisible by the pooling ``factor``."""
    n_tokens = check_int("n_tokens", n_tokens, minimum=1)
    factor = check_int("factor", factor, minimum=1)
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"n_tokens must be a square number of patches (a side x side grid), got {n_tokens}")
    if side % factor:
        raise ValueError(f"the grid side ({side}, from {n_tokens} patches) must be divisible by the pooling "
                         f"factor ({factor})")
    return side


def _to_map(x: torch.Tensor, factor: int = 1) -> torch.Tensor:
    """(B, N, d) tokens as a (B, d, side, side) feature map."""
    side = grid_side(x.shape[1], factor)
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, d, h, w) feature map as (B, h * w, d) tokens, row-major like the ViT's patches."""
    return x.flatten(2).transpose(1, 2)


def _check_dims(d_vision, d_text) -> tuple[int, int]:
    return check_int("d_vision", d_vision, minimum=1), check_int("d_text", d_text, minimum=1)


def _check_features(x, projector) -> torch.Tensor:
    check_tensor("image_features", x, ndim=3, kind="float")
    if x.shape[-1] != projector.d_vision:
        raise ValueError(f"image_features must have {projector.d_vision} channels (the projector's d_vision), "
                         f"got {x.shape[-1]}")
    return x


class MLPProjector(nn.Module):
    """LLaVA-1.5's ``mlp2x_gelu`` connector: ``W_2 GELU(W_1 x + b_1) + b_2`` on every patch token, so all
    ``N`` tokens reach the LM (576 for CLIP ViT-L/14-336). Parameters: ``d_v d_t + d_t + d_t^2 + d_t``."""

    def __init__(self, d_vision: int, d_text: int):
        super().__init__()
        self.d_vision, self.d_text = _check_dims(d_vision, d_text)
        self.linear_1 = nn.Linear(self.d_vision, self.d_text)
        self.linear_2 = nn.Linear(self.d_text, self.d_text)

    def out_tokens(self, n_tokens: int) -> int:
        return check_int("n_tokens", n_tokens, minimum=1)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        x = _check_features(image_features, self)
        return self.linear_2(F.gelu(self.linear_1(x)))


class PoolProjector(nn.Module):
    """The MLP, then ``factor`` x ``factor`` average pooling over the token grid: ``N / factor^2`` tokens and
    no new parameters. LDPv2 without its positional conv (the ablation that isolates PEG)."""

    def __init__(self, d_vision: int, d_text: int, factor: int = 2):
        super().__init__()
        self.d_vision, self.d_text = _check_dims(d_vision, d_text)
        self.factor = check_int("factor", factor, minimum=1)
        self.mlp = MLPProjector(self.d_vision, self.d_text)

    def out_tokens(self, n_tokens: int) -> int:
        return (grid_side(n_tokens, self.factor) // self.factor) ** 2

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        x = self.mlp(_check_features(image_features, self))
        return _to_tokens(F.avg_pool2d(_to_map(x, self.factor), self.factor))


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (timm's ``LayerNorm2d``, as LDP uses)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(check_int("channels", channels, minimum=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    """MobileNetV3's squeeze-and-excitation gate (Howard et al. 2019): global average pool, a bottleneck of
    ``C / 4`` (torchvision's ``_make_divisible``: at least 8, rounded to a multiple of 8, plus 8 if rounding
    lost more than 10%), ReLU, expansion, hard-sigmoid, and a per-channel scale."""

    def __init__(self, channels: int):
        super().__init__()
        channels = check_int("channels", channels, minimum=1)
        squeezed = max(8, int(channels / 4 + 4) // 8 * 8)
        if squeezed < 0.9 * channels / 4:
            squeezed += 8
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(scale))))


class InvertedResidual(nn.Module):
    """A MobileNetV3 block with expansion 1, as in MobileVLM's LDP: depthwise 3x3 (``stride`` 1 or 2) ->
    norm -> hard-swish -> SE -> pointwise 1x1 -> norm, plus the input when ``stride == 1``."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        channels = check_int("channels", channels, minimum=1)
        self.stride = check_choice("stride", stride, (1, 2))
        self.depthwise = nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)
        self.norm_1 = ChannelNorm(channels)
        self.se = SqueezeExcite(channels)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm_2 = ChannelNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm_2(self.pointwise(self.se(F.hardswish(self.norm_1(self.depthwise(x))))))
        return x + y if self.stride == 1 else y


class LDP(nn.Module):
    """MobileVLM's lightweight downsample projector (Chu et al. 2023): the token-wise MLP, then two
    MobileNetV3 blocks on the token grid, the second with a **stride-2 depthwise conv** that keeps one token
    in four (576 -> 144). The strided conv sees each token's 3x3 neighbourhood with learned per-offset
    weights, so position survives the downsampling."""

    def __init__(self, d_vision: int, d_text: int):
        super().__init__()
        self.d_vision, self.d_text = _check_dims(d_vision, d_text)
        self.mlp = MLPProjector(self.d_vision, self.d_text)
        self.block_1 = InvertedResidual(self.d_text, stride=1)
        self.block_2 = InvertedResidual(self.d_text, stride=2)

    def out_tokens(self, n_tokens: int) -> int:
        return (grid_side(n_tokens, 2) // 2) ** 2

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        x = self.mlp(_check_features(image_features, self))
        return _to_tokens(self.block_2(self.block_1(_to_map(x, 2))))


class PEG(nn.Module):
    """Positional encoding generator (Chu et al. 2021): ``x + DWConv3x3(x)``, a residual depthwise conv with
    bias. Zero padding at the border makes its output depend on where a token is, so it injects position
    for ``9 d + d`` parameters."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(check_int("channels", channels, minimum=1), channels, 3, 1, 1, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class LDPv2(nn.Module):
    """MobileVLM V2's projector (Chu et al. 2024): feature transformation ``W_2 GELU(W_1 f)``, token
    reduction by 2x2 average pooling, and position injection by :class:`PEG`:
    ``H_v = PEG(AvgPool_2x2(MLP(f))) = P + DWConv(P)``. It drops LDP's SE, norms and strided conv."""

    def __init__(self, d_vision: int, d_text: int, factor: int = 2):
        super().__init__()
        self.d_vision, self.d_text = _check_dims(d_vision, d_text)
        self.factor = check_int("factor", factor, minimum=1)
        self.mlp = MLPProjector(self.d_vision, self.d_text)
        self.peg = PEG(self.d_text)

    def out_tokens(self, n_tokens: int) -> int:
        return (grid_side(n_tokens, self.factor) // self.factor) ** 2

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        x = self.mlp(_check_features(image_features, self))
        return _to_tokens(self.peg(F.avg_pool2d(_to_map(x, self.factor), self.factor)))


class QueryProjector(nn.Module):
    """A one-layer resampler with ``n_queries`` learned queries (Flamingo's Perceiver resampler, BLIP-2's
    Q-Former in miniature): the patch tokens are projected to ``d_text``, the queries cross-attend to them,
    ``q' = q + Attn(LN(q), LN(k), LN(k))``, then a residual MLP. The output count is fixed by the queries
    whatever the grid, and nothing ties a query to a place in the image: the patches' order reaches it only
    through whatever position the vision features themselves carry."""

    def __init__(self, d_vision: int, d_text: int, n_queries: int = 16, heads: int = 4):
        super().__init__()
        self.d_vision, self.d_text = _check_dims(d_vision, d_text)
        self.n_queries = check_int("n_queries", n_queries, minimum=1)
        heads = check_int("heads", heads, minimum=1)
        if self.d_text % heads:
            raise ValueError(f"d_text ({self.d_text}) must be divisible by heads ({heads})")
        self.input = nn.Linear(self.d_vision, self.d_text)
        self.queries = nn.Parameter(torch.randn(self.n_queries, self.d_text) * 0.02)
        self.norm_q, self.norm_kv, self.norm_out = (nn.LayerNorm(self.d_text) for _ in range(3))
        self.attention = nn.MultiheadAttention(self.d_text, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(self.d_text, 2 * self.d_text), nn.GELU(), nn.Linear(2 * self.d_text, self.d_text))

    def out_tokens(self, n_tokens: int) -> int:
        check_int("n_tokens", n_tokens, minimum=1)
        return self.n_queries

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(self.input(_check_features(image_features, self)))
        q = self.queries.expand(kv.shape[0], -1, -1)
        q = q + self.attention(self.norm_q(q), kv, kv, need_weights=False)[0]
        return q + self.mlp(self.norm_out(q))


#: The chapter's projectors by name, in the order it reports them.
PROJECTORS = {"mlp": MLPProjector, "pool": PoolProjector, "ldp": LDP, "ldpv2": LDPv2, "query": QueryProjector}


def make_projector(name: str, d_vision: int, d_text: int) -> nn.Module:
    """A fresh projector by name: ``mlp``, ``pool``, ``ldp``, ``ldpv2`` or ``query``."""
    check_choice("name", name, tuple(PROJECTORS))
    return PROJECTORS[name](d_vision, d_text)


def parameter_count(module: nn.Module) -> int:
    """The number of parameters of a module (trainable or not)."""
    check_module("module", module)
    return sum(p.numel() for p in module.parameters())


def projector_flops(projector: nn.Module, n_tokens: int, d_vision: int | None = None) -> int:
    """Floating-point operations (2 per multiply-add) of one image through ``projector`` from ``n_tokens``
    patch features, as counted by ``torch.utils.flop_counter`` (matrix multiplies and convolutions;
    element-wise ops, pooling and norms are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    check_module("projector", projector)
    n_tokens = check_int("n_tokens", n_tokens, minimum=1)
    d_vision = getattr(projector, "d_vision", None) if d_vision is None else check_int("d_vision", d_vision, minimum=1)
    if d_vision is None:
        raise ValueError("d_vision must be given for a projector without a d_vision attribute")
    x = torch.zeros(1, n_tokens, d_vision)
    with FlopCounterMode(display=False) as counter:  # not under no_grad: the module tracker needs autograd
        projector(x)
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# 4. The VLM: transformers' LLaVA built from configs, with our projector
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionConfig:
    """A CLIP-style ViT for the scenes: 32x32 images, 4x4 patches -> an 8x8 grid of 64 patch tokens."""

    image_size: int = 32
    patch_size: int = 4
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 128

    def __post_init__(self):
        for name in ("image_size", "patch_size", "hidden", "layers", "heads", "intermediate"):
            check_int(name, getattr(self, name), minimum=1)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")

    def hf(self):
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(image_size=self.image_size, patch_size=self.patch_size, hidden_size=self.hidden,
                                num_hidden_layers=self.layers, num_attention_heads=self.heads,
                                intermediate_size=self.intermediate, num_channels=3)


@dataclass(frozen=True)
class TextConfig:
    """The language model: a Llama (the course's tiny-llama architecture, smaller) or a GPT-2."""

    architecture: str = "llama"
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 256
    max_positions: int = 640

    def __post_init__(self):
        check_choice("architecture", self.architecture, ("llama", "gpt2"))
        for name in ("hidden", "layers", "heads", "intermediate", "max_positions"):
            check_int(name, getattr(self, name), minimum=1)

    def hf(self, tok):
        from transformers import GPT2Config, LlamaConfig

        special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        if self.architecture == "llama":
            return LlamaConfig(vocab_size=len(tok), hidden_size=self.hidden, intermediate_size=self.intermediate,
                               num_hidden_layers=self.layers, num_attention_heads=self.heads,
                               num_key_value_heads=self.heads, max_position_embeddings=self.max_positions,
                               tie_word_embeddings=False, **special)
        return GPT2Config(vocab_size=len(tok), n_embd=self.hidden, n_layer=self.layers, n_head=self.heads,
                          n_inner=self.intermediate, n_positions=self.max_positions, tie_word_embeddings=False,
                          **special)


def build_tiny_vlm(projector: str | nn.Module = "mlp", tokenizer=None, vision: VisionConfig = VisionConfig(),
                   text: TextConfig = TextConfig(), vision_tower: nn.Module | None = None):
    """An untrained ``LlavaForConditionalGeneration`` from configs with the projector assigned to
    ``model.model.multi_modal_projector``: a name from :data:`PROJECTORS` (a fresh one is built), or a
    projector module of this file's kind (e.g. ``PoolProjector(64, 64, factor=4)``), used as given.
    ``config.image_seq_length`` is set to the projector's output count (:func:`count_visual_tokens`),
    which is how many ``<image>`` tokens a prompt must carry. The vision features are the last layer's
    patch tokens (``vision_feature_layer=-1``, CLS dropped by ``"default"``). ``vision_tower``, if
    given, is copied in (a pre-trained encoder)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    if isinstance(projector, nn.Module):
        if not callable(getattr(projector, "out_tokens", None)):
            raise TypeError("projector must be a name from vlm.PROJECTORS or a projector module with "
                            f"out_tokens(n), got {type(projector).__name__}")
        wanted = (vision.hidden, text.hidden) if isinstance(vision, VisionConfig) and isinstance(
            text, TextConfig) else None
        got = (getattr(projector, "d_vision", None), getattr(projector, "d_text", None))
        if wanted is not None and got != wanted:
            raise ValueError(f"projector must map d_vision={wanted[0]} to d_text={wanted[1]} (the configs' "
                             f"widths), got d_vision={got[0]}, d_text={got[1]}")
    else:
        check_choice("projector", projector, tuple(PROJECTORS))
    if not isinstance(vision, VisionConfig):
        raise TypeError(f"vision must be a VisionConfig, got {type(vision).__name__}")
    if not isinstance(text, TextConfig):
        raise TypeError(f"text must be a TextConfig, got {type(text).__name__}")
    tok = shapes_tokenizer() if tokenizer is None else tokenizer
    if IMAGE_TOKEN not in tok.get_vocab():
        raise ValueError(f"tokenizer must have the image token {IMAGE_TOKEN!r} in its vocabulary")
    patches = (vision.image_size // vision.patch_size) ** 2
    proj = projector if isinstance(projector, nn.Module) else make_projector(projector, vision.hidden, text.hidden)
    config = LlavaConfig(vision_config=vision.hf().to_dict(), text_config=text.hf(tok).to_dict(),
                         image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
                         vision_feature_select_strategy="default", image_seq_length=proj.out_tokens(patches),
                         tie_word_embeddings=False)
    config.companion_projector = projector if isinstance(projector, str) else type(projector).__name__
    model = LlavaForConditionalGeneration(config)
    model.model.multi_modal_projector = proj
    if vision_tower is not None:
        check_module("vision_tower", vision_tower)
        model.model.vision_tower.load_state_dict(vision_tower.state_dict())
    return model.eval()


def _parts(model):
    """(vision tower, projector, language model, lm head) of a LLaVA-style model, found by name."""
    check_module("model", model)
    inner = getattr(model, "model", model)
    names = ("vision_tower", "multi_modal_projector", "language_model")
    if not all(hasattr(inner, n) for n in names) or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"model must be a LLaVA-style model (with {', '.join(names)}), got {type(model).__name__}")
    return inner.vision_tower, inner.multi_modal_projector, inner.language_model, model.get_output_embeddings()


def count_visual_tokens(model) -> int:
    """How many visual tokens reach the LM for one image: the vision grid's patch count (the CLS token
    dropped under the ``"default"`` strategy, kept under ``"full"``), then the projector's reduction.

    Works on any ``LlavaForConditionalGeneration``: one with transformers' own MLP projector (576 for
    llava-1.5) or with a projector of this module assigned to ``model.model.multi_modal_projector``."""
    _, projector, _, _ = _parts(model)
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    if getattr(model.config, "vision_feature_select_strategy", "default") == "full":
        patches += 1
    if hasattr(projector, "out_tokens"):
        return int(projector.out_tokens(patches))
    return patches  # transformers' LlavaMultiModalProjector is token-wise


def vlm_inputs(model, tokenizer, questions: list, n_image_tokens: int | None = None):
    """``(input_ids, attention_mask, last)`` for a batch of questions: ``<bos>``, as many ``<image>`` tokens as
    the projector outputs, then the question; right-padded (causal attention never looks right, so a
    pad cannot change a real token), and ``last`` = the index of each row's final real token, where the
    answer is read. A wrong ``n_image_tokens`` is refused here, naming both counts, instead of
    transformers' later "Image features and image tokens do not match"."""
    from companion.train import pad_batch

    check_texts("questions", questions, nonempty_each=True)
    expected = count_visual_tokens(model)
    n = expected if n_image_tokens is None else check_int("n_image_tokens", n_image_tokens, minimum=0)
    if n != expected:
        raise ValueError(f"n_image_tokens ({n}) must match the projector's output of {expected} visual tokens "
                         f"({type(_parts(model)[1]).__name__}); set config.image_seq_length and build prompts "
                         "with that many image tokens")
    image_id = model.config.image_token_id
    rows = [[tokenizer.bos_token_id] + [image_id] * n + tokenizer(q, add_special_tokens=False)["input_ids"]
            for q in questions]
    ids, mask = pad_batch(rows, tokenizer.pad_token_id, side="right")
    return ids, mask, mask.sum(1) - 1


def vision_features(model, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The frozen encoder's patch features ``(B, N, d_vision)``, exactly as LLaVA selects them (the
    configured layer, CLS dropped under ``"default"``), computed once so that training the projector and LM
    does not re-run the frozen tower every step."""
    tower, _, _, _ = _parts(model)
    check_tensor("pixel_values", pixel_values, ndim=4, kind="float", finite=True, nonempty=True)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    layer = model.config.vision_feature_layer
    out = []
    with torch.no_grad():
        for start in range(0, len(pixel_values), batch_size):
            hidden = tower(pixel_values[start:start + batch_size], output_hidden_states=True).hidden_states[layer]
            out.append(hidden[:, 1:] if model.config.vision_feature_select_strategy == "default" else hidden)
    return torch.cat(out)


def merged_logits(model, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """LLaVA's forward from precomputed vision features: project them, scatter them into the embeddings at
    the ``<image>`` positions (in order), run the LM. Equal to ``model(input_ids, pixel_values)`` when
    ``features = vision_features(model, pixel_values)`` (tested)."""
    _, projector, language_model, head = _parts(model)
    check_tensor("features", features, ndim=3, kind="float")
    check_tensor("input_ids", input_ids, ndim=2, kind="int")
    projected = projector(features)
    mask = input_ids == model.config.image_token_id
    if int(mask.sum()) != projected.shape[0] * projected.shape[1]:
        raise ValueError(f"input_ids hold {int(mask.sum())} image tokens but the projector output "
                         f"{projected.shape[0] * projected.shape[1]} visual tokens ({projected.shape[1]} per image)")
    embeds = model.get_input_embeddings()(input_ids)
    embeds = embeds.masked_scatter(mask.unsqueeze(-1), projected.to(embeds.dtype))
    hidden = language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
    return head(hidden)


# ---------------------------------------------------------------------------------------------
# 5. Training and evaluation
# ---------------------------------------------------------------------------------------------


class CellClassifier(nn.Module):
    """The vision encoder's pre-training model: a CLIP-style ViT and a linear head that names, from each
    patch token, the content of the grid cell the patch lies in (empty, or one of 12 colour-shape pairs).
    It stands in for CLIP's image-text pre-training: the encoder learns what is where before any VLM
    is built on it."""

    def __init__(self, vision: VisionConfig = VisionConfig(), n_classes: int = 1 + len(COLOURS) * len(SHAPES)):
        super().__init__()
        from transformers import CLIPVisionModel

        if not isinstance(vision, VisionConfig):
            raise TypeError(f"vision must be a VisionConfig, got {type(vision).__name__}")
        self.vision = vision
        self.tower = CLIPVisionModel(vision.hf())
        self.head = nn.Linear(vision.hidden, check_int("n_classes", n_classes, minimum=2))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(pixel_values).last_hidden_state[:, 1:])


def patch_labels(cells: np.ndarray, patches_per_side: int) -> torch.Tensor:
    """Each patch's label: the content of the cell it lies in, ``(n, patches)`` row-major."""
    if not isinstance(cells, np.ndarray) or cells.ndim != 3:
        raise TypeError(f"cells must be a 3-D numpy array (n, grid, grid), got {type(cells).__name__}")
    patches_per_side = check_int("patches_per_side", patches_per_side, minimum=1)
    grid = cells.shape[1]
    if patches_per_side % grid:
        raise ValueError(f"patches_per_side ({patches_per_side}) must be a multiple of the grid ({grid})")
    k = patches_per_side // grid
    return torch.from_numpy(cells.repeat(k, axis=1).repeat(k, axis=2).reshape(len(cells), -1))


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_vision_encoder(dataset: ShapesDataset, steps: int = 600, batch_size: int = 64, lr: float = 3e-3,
                            seed: int = 0, vision: VisionConfig = VisionConfig()):
    """Train :class:`CellClassifier` on the scenes (cross-entropy on every patch); ``(model, losses)``."""
    if not isinstance(dataset, ShapesDataset):
        raise TypeError(f"dataset must be a ShapesDataset, got {type(dataset).__name__}")
    steps = check_int("steps", steps, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    lr = check_positive_float("lr", lr)
    seed_everything(check_int("seed", seed, minimum=0))
    model = CellClassifier(vision)
    labels = patch_labels(dataset.cells, vision.image_size // vision.patch_size)
    pixels = dataset.pixels()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine_lr(s, steps, steps // 20 + 1))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        index = torch.randint(len(pixels), (batch_size,), generator=generator)
        logits = model(pixels[index])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[index].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(round(loss.item(), 5))
    return model.eval(), losses


def cell_accuracy(model: CellClassifier, dataset: ShapesDataset) -> tuple[int, int]:
    """``(correct, total)`` patch-level predictions of the cell content on ``dataset``."""
    if not isinstance(model, CellClassifier):
        raise TypeError(f"model must be a CellClassifier, got {type(model).__name__}")
    if not isinstance(dataset, ShapesDataset):
        raise TypeError(f"dataset must be a ShapesDataset, got {type(dataset).__name__}")
    labels = patch_labels(dataset.cells, model.vision.image_size // model.vision.patch_size)
    with torch.no_grad():
        predicted = torch.cat([model(dataset.pixels(range(s, min(s + 256, len(dataset))))).argmax(-1)
                               for s in range(0, len(dataset), 256)])
    return int((predicted == labels).sum()), int(labels.numel())


def training_batch(model, tokenizer, dataset: ShapesDataset, scenes: list, generator: torch.Generator):
    """``(input_ids, attention_mask, labels)`` for training on ``scenes``: each row is ``<bos>``, the image
    tokens, then *all* of that scene's questions, each followed by its one-word answer, in a random order
    (from ``generator``). ``labels`` hold the answer ids at the answers' positions and -100 elsewhere, so
    the loss is the answers' cross-entropy only. One image's visual tokens thus serve ~5 answers; at test
    time a question is asked alone, right after the image (:func:`vlm_inputs`), as the first training
    question is."""
    from companion.train import pad_batch

    if not isinstance(dataset, ShapesDataset):
        raise TypeError(f"dataset must be a ShapesDataset, got {type(dataset).__name__}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not isinstance(scenes, list) or not scenes or not all(isinstance(i, int) and 0 <= i < len(dataset)
                                                              for i in scenes):
        raise ValueError(f"scenes must be a non-empty list of scene indices in [0, {len(dataset)}), got {scenes!r:.80}")
    by_scene = _questions_by_scene(dataset)
    n = count_visual_tokens(model)
    rows, targets = [], []
    for i in scenes:
        asked = by_scene[i]
        row = [tokenizer.bos_token_id] + [model.config.image_token_id] * n
        target = [-100] * len(row)
        for j in torch.randperm(len(asked), generator=generator).tolist():
            words = tokenizer(asked[j].text, add_special_tokens=False)["input_ids"]
            row += words + [tokenizer.convert_tokens_to_ids(asked[j].answer)]
            target += [-100] * len(words) + [row[-1]]
        rows.append(row)
        targets.append(target)
    ids, mask = pad_batch(rows, tokenizer.pad_token_id, side="right")
    labels, _ = pad_batch(targets, -100, side="right")
    return ids, mask, labels


def _questions_by_scene(dataset: ShapesDataset) -> list:
    cached = getattr(dataset, "_by_scene", None)
    if cached is None:
        cached = [[] for _ in range(len(dataset))]
        for q in dataset.questions:
            cached[q.scene].append(q)
        dataset._by_scene = cached
    return cached


def train_vlm(model, dataset: ShapesDataset, tokenizer, steps: int = 600, batch_size: int = 32, lr: float = 3e-3,
              seed: int = 0, train: tuple = ("projector", "lm"), features: torch.Tensor | None = None):
    """Train a LLaVA-style VLM on ``dataset``'s questions: the cross-entropy of every one-word answer, read
    at the token before it (:func:`training_batch`: ``batch_size`` scenes a step, all their questions).
    The vision tower stays frozen (its features are computed once); ``train`` names what learns:
    ``("projector",)`` is MobileVLM's stage 1 (align a new projector to a trained LM), ``("projector",
    "lm")`` its stage 2. Scenes and question orders are drawn with ``seed``, so projectors trained with
    the same seed see the same examples in the same order (an equal budget: ``steps * batch_size``
    scenes). Returns the per-step losses."""
    _, projector, language_model, head = _parts(model)
    if not isinstance(dataset, ShapesDataset):
        raise TypeError(f"dataset must be a ShapesDataset, got {type(dataset).__name__}")
    steps = check_int("steps", steps, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    lr = check_positive_float("lr", lr)
    seed = check_int("seed", seed, minimum=0)
    if not isinstance(train, tuple) or not train or not set(train) <= {"projector", "lm"}:
        raise ValueError(f"train must be a non-empty tuple of 'projector' and/or 'lm', got {train!r}")
    if features is None:
        features = vision_features(model, dataset.pixels())
    check_tensor("features", features, ndim=3, kind="float")
    if len(features) != len(dataset):
        raise ValueError(f"features must have one row per scene ({len(dataset)}), got {len(features)}")
    for p in model.parameters():
        p.requires_grad_(False)
    trained = ([projector] if "projector" in train else []) + \
        ([language_model, head, model.get_input_embeddings()] if "lm" in train else [])
    params = list(dict.fromkeys(p for m in trained for p in m.parameters()))
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine_lr(s, steps, steps // 20 + 1))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        scenes = torch.randint(len(dataset), (batch_size,), generator=generator).tolist()
        ids, mask, labels = training_batch(model, tokenizer, dataset, scenes, generator)
        logits = merged_logits(model, features[scenes], ids, mask)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(round(loss.item(), 5))
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return losses


def answer(model, tokenizer, pixel_values: torch.Tensor, questions: list, batch_size: int = 128) -> list:
    """The model's one-word answers: the most likely next token after each question (over the whole
    vocabulary, nothing constrained), from LLaVA's own forward on the pixels. ``pixel_values[i]`` is the
    image of ``questions[i]``."""
    _parts(model)
    check_tensor("pixel_values", pixel_values, ndim=4, kind="float", finite=True, nonempty=True)
    check_texts("questions", questions, nonempty_each=True)
    if len(pixel_values) != len(questions):
        raise ValueError(f"pixel_values and questions must have the same length, got {len(pixel_values)} "
                         f"and {len(questions)}")
    batch_size = check_int("batch_size", batch_size, minimum=1)
    out = []
    with torch.no_grad():
        for s in range(0, len(questions), batch_size):
            ids, mask, last = vlm_inputs(model, tokenizer, questions[s:s + batch_size])
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values[s:s + batch_size]).logits
            out += tokenizer.convert_ids_to_tokens(logits[torch.arange(len(ids)), last].argmax(-1).tolist())
    return out


def train_vlms_jointly(models: dict, dataset: ShapesDataset, tokenizer, steps: int = 600, batch_size: int = 32,
                       lr: float = 3e-3, seed: int = 0, features: torch.Tensor | None = None) -> dict:
    """Train several LLaVA-style VLMs that differ only in their projector around **one shared language
    model** (the first model's LM and head are given to all), on the same batches: each step draws
    ``batch_size`` scenes (:func:`training_batch`), every projector reads them, and the step minimises
    the mean of the projectors' answer losses. Each projector thus gets exactly the same examples and
    steps, and the LM, which serves all of them, sees every batch once per projector. The vision tower
    stays frozen. Afterwards each model holds its own copy of the shared LM. Returns
    ``{name: per-step losses}``."""
    import copy

    if not isinstance(models, dict) or not models:
        raise TypeError(f"models must be a non-empty dict of name -> LLaVA-style model, got {type(models).__name__}")
    for name, model in models.items():
        _parts(model)
    if not isinstance(dataset, ShapesDataset):
        raise TypeError(f"dataset must be a ShapesDataset, got {type(dataset).__name__}")
    steps = check_int("steps", steps, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    lr = check_positive_float("lr", lr)
    seed = check_int("seed", seed, minimum=0)
    first = next(iter(models.values()))
    if features is None:
        features = vision_features(first, dataset.pixels())
    check_tensor("features", features, ndim=3, kind="float")
    if len(features) != len(dataset):
        raise ValueError(f"features must have one row per scene ({len(dataset)}), got {len(features)}")
    language_model, head = first.model.language_model, first.lm_head
    for model in models.values():
        model.model.language_model, model.lm_head = language_model, head
        for p in model.parameters():
            p.requires_grad_(False)
    params = list(dict.fromkeys([*language_model.parameters(), *head.parameters(),
                                 *(p for m in models.values() for p in m.model.multi_modal_projector.parameters())]))
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine_lr(s, steps, steps // 20 + 1))
    generator = torch.Generator().manual_seed(seed)
    losses = {name: [] for name in models}
    for model in models.values():
        model.train()
    for _ in range(steps):
        scenes = torch.randint(len(dataset), (batch_size,), generator=generator).tolist()
        order = torch.randint(2**31 - 1, (1,), generator=generator).item()  # the same question order for all
        total = 0.0
        for name, model in models.items():
            ids, mask, labels = training_batch(model, tokenizer, dataset, scenes, torch.Generator().manual_seed(order))
            logits = merged_logits(model, features[scenes], ids, mask)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
            total = total + loss / len(models)
            losses[name].append(round(loss.item(), 5))
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
    for model in models.values():
        model.model.language_model, model.lm_head = copy.deepcopy(language_model), copy.deepcopy(head)
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
    return losses


def correct_answers(model, tokenizer, dataset: ShapesDataset, per_type: int = 300) -> dict:
    """``{question type: [answered correctly?, ...]}`` on the first ``per_type`` questions of each type of
    ``dataset`` (the same questions for every model, so two models can be compared question by question)."""
    if not isinstance(dataset, ShapesDataset):
        raise TypeError(f"dataset must be a ShapesDataset, got {type(dataset).__name__}")
    per_type = check_int("per_type", per_type, minimum=1)
    result = {}
    for kind in QUESTION_TYPES:
        asked = dataset.of_kind(kind)[:per_type]
        if asked:
            given = answer(model, tokenizer, dataset.pixels([q.scene for q in asked]), [q.text for q in asked])
            result[kind] = [g == q.answer for g, q in zip(given, asked)]
    return result


def evaluate_vlm(model, tokenizer, dataset: ShapesDataset, per_type: int = 300) -> dict:
    """``{question type: (correct, asked)}`` on the first ``per_type`` questions of each type of ``dataset``."""
    return {kind: (sum(c), len(c)) for kind, c in correct_answers(model, tokenizer, dataset, per_type).items()}


def paired_comparison(correct_a: list, correct_b: list) -> tuple[int, int, float]:
    """McNemar's exact test on two models' answers to the same questions: ``(a_only, b_only, p)``, the
    questions only A got right, only B got right, and the two-sided binomial p-value of that split under
    "equally good" (questions both got right or both got wrong carry no information about the difference)."""
    from scipy.stats import binomtest

    for name, value in (("correct_a", correct_a), ("correct_b", correct_b)):
        if not isinstance(value, list) or not value or not all(isinstance(v, bool) for v in value):
            raise TypeError(f"{name} must be a non-empty list of bool, got {type(value).__name__}")
    if len(correct_a) != len(correct_b):
        raise ValueError(f"correct_a and correct_b must have the same length, got {len(correct_a)} and "
                         f"{len(correct_b)}")
    a_only = sum(a and not b for a, b in zip(correct_a, correct_b))
    b_only = sum(b and not a for a, b in zip(correct_a, correct_b))
    p = 1.0 if a_only + b_only == 0 else float(binomtest(a_only, a_only + b_only, 0.5).pvalue)
    return a_only, b_only, p


def token_columns(n_tokens: int, grid: int) -> torch.Tensor:
    """The board column (0 .. ``grid`` - 1) that each of a projector's ``n_tokens`` output tokens covers,
    for projectors whose output is a row-major square token grid (all but :class:`QueryProjector`)."""
    side = grid_side(n_tokens)
    grid = check_int("grid", grid, minimum=1)
    if side % grid:
        raise ValueError(f"the token grid side ({side}) must be a multiple of the board's grid ({grid})")
    return (torch.arange(n_tokens) % side) // (side // grid)


def grid_apply(tokens: torch.Tensor, fn) -> torch.Tensor:
    """Apply ``fn`` to ``(B, N, d)`` tokens laid out as their ``(B, d, side, side)`` grid map (row-major,
    like the ViT's patches) and return the result as tokens again: e.g. ``grid_apply(f, PEG(d))`` or a
    parameter-free 2x2 average pooling ``grid_apply(f, lambda m: F.avg_pool2d(m, 2))``."""
    check_tensor("tokens", tokens, ndim=3, kind="float")
    if not callable(fn):
        raise TypeError(f"fn must be callable (a module or function on a (B, d, side, side) map), got "
                        f"{type(fn).__name__}")
    return _to_tokens(fn(_to_map(tokens)))


def position_probe(model, train_set: ShapesDataset, test_set: ShapesDataset, n_scenes: int = 1000,
                   projector=None, by_scene: bool = False):
    """How much column information survives the projector: a least-squares linear probe from each visual
    token (the projector's output, before the LM) to the board column it covers, fitted on ``n_scenes``
    training scenes and scored on ``n_scenes`` test scenes; ``(correct, total)`` over all test tokens.
    Chance is ``1 / grid``. It measures what the LM *could* read, not what it learned to read.
    ``projector`` (default: the model's own) may be any callable from the encoder's ``(B, N, d_v)``
    features to square-grid tokens, for controls such as the raw features pooled with no projector.
    ``by_scene=True`` returns instead the number of correctly probed tokens of each test scene (an
    integer array): the tokens of one scene are correlated, so intervals should resample scenes."""
    _, own, _, _ = _parts(model)
    if projector is None:
        projector = own
    elif not callable(projector):
        raise TypeError(f"projector must be callable (features -> tokens) or None, got {type(projector).__name__}")
    if not isinstance(by_scene, bool):
        raise TypeError(f"by_scene must be a bool, got {type(by_scene).__name__}")
    for name, value in (("train_set", train_set), ("test_set", test_set)):
        if not isinstance(value, ShapesDataset):
            raise TypeError(f"{name} must be a ShapesDataset, got {type(value).__name__}")
    n_scenes = check_int("n_scenes", n_scenes, minimum=1)

    def tokens(dataset):
        index = list(range(min(n_scenes, len(dataset))))
        with torch.no_grad():
            out = projector(vision_features(model, dataset.pixels(index)))
        return out.reshape(-1, out.shape[-1]), token_columns(out.shape[1], dataset.grid).repeat(len(index))

    x_train, y_train = tokens(train_set)
    x_test, y_test = tokens(test_set)
    ones = torch.ones(len(x_train), 1)
    targets = F.one_hot(y_train, train_set.grid).float()
    weights = torch.linalg.lstsq(torch.cat([x_train, ones], 1), targets).solution
    predicted = (torch.cat([x_test, torch.ones(len(x_test), 1)], 1) @ weights).argmax(-1)
    hits = predicted == y_test
    if by_scene:
        return hits.reshape(min(n_scenes, len(test_set)), -1).sum(1).numpy()
    return int(hits.sum()), len(y_test)


def chance_accuracy(dataset: ShapesDataset, kind: str) -> float:
    """The accuracy of always giving the most frequent answer of a question type (the no-image baseline a
    VLM must beat: a model that ignores the picture can learn at least this from the question alone)."""
    if not isinstance(dataset, ShapesDataset):
        raise TypeError(f"dataset must be a ShapesDataset, got {type(dataset).__name__}")
    asked = dataset.of_kind(kind)
    if not asked:
        raise ValueError(f"dataset has no questions of kind {kind!r}")
    answers = [q.answer for q in asked]
    return max(answers.count(a) for a in set(answers)) / len(answers)


# ---------------------------------------------------------------------------------------------
# 6. Cost: prefill FLOPs and latency vs the number of visual tokens
# ---------------------------------------------------------------------------------------------


def attention_flops(model, n_tokens: int) -> int:
    """FLOPs of the attention products of one full-sequence forward over ``n_tokens`` tokens (batch 1):
    per layer ``QK^T`` and ``AV`` each cost ``2 T^2 (heads * head_dim)``, so ``4 L T^2 d_attn`` in all (the
    quadratic term of the chapter's prefill estimate). It counts the full ``T x T`` product, as the dense
    (math) kernel computes it before the causal mask; a kernel that skips the masked half does about half."""
    _, _, language_model, _ = _parts(model)
    n_tokens = check_int("n_tokens", n_tokens, minimum=1)
    config = language_model.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    head_dim = getattr(config, "head_dim", None) or width // heads
    return int(4 * layers * n_tokens * n_tokens * heads * head_dim)


def prefill_flops(model, n_visual_tokens: int, n_text_tokens: int = 10) -> int:
    """FLOPs of the LM's prefill over ``n_visual_tokens`` visual plus ``n_text_tokens`` text embeddings,
    batch 1 (the vision tower and projector are not included): the linear layers and the LM head as
    ``torch.utils.flop_counter`` counts them, plus the attention products :func:`attention_flops` (full
    ``T x T``, added analytically: the counter does not see the fused CPU attention kernel; any attention
    it did count is replaced, so the total is the same on every backend)."""
    from torch.utils.flop_counter import FlopCounterMode

    _, _, language_model, head = _parts(model)
    n_visual_tokens = check_int("n_visual_tokens", n_visual_tokens, minimum=0)
    n_text_tokens = check_int("n_text_tokens", n_text_tokens, minimum=1)
    n_tokens = n_visual_tokens + n_text_tokens
    embeds = torch.zeros(1, n_tokens, model.get_input_embeddings().embedding_dim)
    with FlopCounterMode(display=False) as counter:
        head(language_model(inputs_embeds=embeds).last_hidden_state[:, -1:])
    counted = counter.get_flop_counts().get("Global", {})
    attention_counted = sum(v for op, v in counted.items() if "attention" in str(op))
    linear = int(counter.get_total_flops()) - int(attention_counted)
    return linear + attention_flops(model, n_tokens)


def prefill_latency(model, n_visual_tokens: int, n_text_tokens: int = 10, repeats: int = 20) -> float:
    """Median wall-clock seconds of the LM's prefill (batch 1) over ``n_visual_tokens + n_text_tokens``
    embeddings, after one warm-up call: the time to first token that the visual tokens cost."""
    _, _, language_model, head = _parts(model)
    n_visual_tokens = check_int("n_visual_tokens", n_visual_tokens, minimum=0)
    n_text_tokens = check_int("n_text_tokens", n_text_tokens, minimum=1)
    repeats = check_int("repeats", repeats, minimum=1)
    embeds = torch.randn(1, n_visual_tokens + n_text_tokens, model.get_input_embeddings().embedding_dim,
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return median_seconds(
            lambda: head(language_model(inputs_embeds=embeds).last_hidden_state[:, -1:]),
            repeats=repeats, warmup=1)


# ---------------------------------------------------------------------------------------------
# 7. The zoo: the vision encoder, then one VLM per projector at an equal budget
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapesData:
    n_train: int = 8000
    n_val: int = 500
    n_test: int = 1000
    seed: int = 0

    def __post_init__(self):
        for name in ("n_train", "n_val", "n_test"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("seed", self.seed, minimum=0)

    def splits(self) -> ShapesSplits:
        return _splits(self)


_SPLITS: dict = {}


def _splits(data: ShapesData) -> ShapesSplits:
    if data not in _SPLITS:
        _SPLITS[data] = shapes_splits(data.n_train, data.n_val, data.n_test, data.seed)
    return _SPLITS[data]


def _image_digest(images: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(images.tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class VisionRecipe(zoo.Recipe):
    """``shapes-vit``: the CLIP-style encoder pre-trained to name every cell's content (then frozen)."""

    vision: VisionConfig = VisionConfig()
    data: ShapesData = ShapesData()
    steps: int = 800
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0

    def fingerprints(self) -> list[str]:
        s = self.data.splits()
        return [_image_digest(s.train.images), _image_digest(s.test.images)]

    def train(self, folder: Path, progress: bool) -> None:
        from safetensors.torch import save_file

        s = self.data.splits()
        started, cpu_started = time.perf_counter(), time.process_time()
        model, losses = pretrain_vision_encoder(s.train, self.steps, self.batch_size, self.lr, self.seed, self.vision)
        seconds = time.perf_counter() - started
        save_file(model.state_dict(), str(Path(folder) / "model.safetensors"))
        zoo.write_card(folder, self, model, seconds, losses, cpu_seconds=round(time.process_time() - cpu_started, 1))

    def read(self, folder: Path):
        from safetensors.torch import load_file

        model = CellClassifier(self.vision)
        model.load_state_dict(load_file(str(check_directory("folder", folder) / "model.safetensors")))
        return model.eval(), None


@dataclass(frozen=True)
class VLMBundleRecipe(zoo.Recipe):
    """``shapes-vlm``: one LLaVA-style VLM per projector on the frozen ``shapes-vit`` encoder, trained
    together around one shared LM (:func:`train_vlms_jointly`): the same steps, batches, learning rate and
    seed for every projector, and the same LM weights in every model at the end."""

    projectors: tuple = ("mlp", "pool", "ldp", "ldpv2", "query")
    text: TextConfig = TextConfig()
    steps: int = 500
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    encoder: str = "shapes-vit"

    def fingerprints(self) -> list[str]:
        from companion.data import fingerprint

        train = zoo.recipe_of(self.encoder).data.splits().train
        vocab = shapes_tokenizer().get_vocab()
        return [zoo.entry_folder(self.encoder).name, " ".join(sorted(vocab, key=vocab.get)),
                fingerprint([f"{q.scene} {q.text} {q.answer}" for q in train.questions])]

    def train(self, folder: Path, progress: bool) -> None:
        from safetensors.torch import save_file

        encoder = zoo.load(self.encoder)
        vision_recipe = zoo.recipe_of(self.encoder)
        s = vision_recipe.data.splits()
        tok = shapes_tokenizer()
        models = {}
        for name in self.projectors:
            seed_everything(self.seed)  # the first model's LM becomes the shared one
            models[name] = build_tiny_vlm(name, tok, vision_recipe.vision, self.text, vision_tower=encoder.model.tower)
        features = vision_features(models[self.projectors[0]], s.train.pixels())
        started, cpu_started = time.perf_counter(), time.process_time()
        losses = train_vlms_jointly(models, s.train, tok, self.steps, self.batch_size, self.lr, self.seed,
                                    features=features)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        for name, model in models.items():
            save_file(model.state_dict(), str(Path(folder) / f"{name}.safetensors"))
        zoo.write_card(folder, self, nn.ModuleDict(models), seconds, losses[self.projectors[0]],
                       cpu_seconds=round(cpu_seconds, 1), losses_per_projector=losses)

    def read(self, folder: Path):
        from safetensors.torch import load_file

        vision_recipe = zoo.recipe_of(self.encoder)
        tok = shapes_tokenizer()
        models = {}
        for name in self.projectors:
            model = build_tiny_vlm(name, tok, vision_recipe.vision, self.text)
            model.load_state_dict(load_file(str(check_directory("folder", folder) / f"{name}.safetensors")))
            models[name] = model.eval()
        return nn.ModuleDict(models), tok


zoo.register("shapes-vit", VisionRecipe())
zoo.register("shapes-vlm", VLMBundleRecipe())
