"""One factory for every network: LeNet or any torchvision classification backbone, with our head."""
import functools
import math
import urllib.error

import torch
from torch import nn

from getData import Number
from models.checkpoint import ModelError, load_checkpoint, load_state, load_weights, refuse_first
from models.lenet import LeNet


# Backbones whose forward is not a plain image -> logits map, or that have no linear head to replace.
UNSUPPORTED = {"googlenet": "returns auxiliary outputs", "inception_v3": "returns auxiliary outputs",
               "squeezenet1_0": "has a convolutional head", "squeezenet1_1": "has a convolutional head"}


# torchvision is imported only where a torchvision network is built or named: importing it adds
# nearly 2 s to a start (its ops pull in torch._dynamo), which a LeNet run or a --help need not pay.
@functools.cache
def model_names() -> tuple[str, ...]:
    """Every name --model accepts: LeNet and torchvision's classification models we can re-head."""
    import torchvision
    return ("lenet", *(n for n in torchvision.models.list_models(module=torchvision.models) if n not in UNSUPPORTED))


# Grad-CAM target by family (name prefix -> (module path, layout)): the last spatial feature map,
# except for ResNets, whose layer2 explains the recipe's network best at 112 px (deletion and
# insertion beat layer3's, layer4's and both baselines' on all five folds) and at 224 px (fold 1):
# README, "Does a map explain anything?". layer4 is a 4 x 4 grid at 112 px, and there no more
# faithful than a centred blob.
# "nhwc": Swin keeps channels last; "tokens": ViT's (B, 1 + H*W, C) sequence with the class token first.
# ViT's head reads the class token alone, so after the last block the patch tokens get no gradient:
# its target is the last block's first LayerNorm, whose output reaches the class token through
# attention. "[-1]" stands for the last child of a container.
CAM_LAYERS = [("lenet", "relu2", "nchw"), ("resnet", "layer2", "nchw"), ("resnext", "layer2", "nchw"),
              ("wide_resnet", "layer2", "nchw"), ("regnet", "trunk_output", "nchw"),
              ("efficientnet", "features", "nchw"), ("mobilenet", "features", "nchw"),
              ("mnasnet", "layers", "nchw"), ("convnext", "features", "nchw"), ("densenet", "features", "nchw"),
              ("vgg", "features", "nchw"), ("alexnet", "features", "nchw"), ("shufflenet", "conv5", "nchw"),
              ("maxvit", "blocks", "nchw"), ("swin", "features", "nhwc"), ("vit", "encoder.layers.[-1].ln_1", "tokens")]


# The layers worth offering to Grad-CAM besides the default, by family (gradcam.py --faithfulness
# and --sanity measure them all): a ResNet's last three stages, 28, 14 and 7 positions a side at 224 px.
CAM_CANDIDATES = [("resnet", ("layer2", "layer3", "layer4")), ("resnext", ("layer2", "layer3", "layer4")),
                  ("wide_resnet", ("layer2", "layer3", "layer4"))]

# The earlier stages the multilayer out-of-distribution score reads beside the head's input
# (models/ood.py), by family: noise, flat colours or text are far from skin in an early stage's
# statistics even where the last stage maps them near a class. A ResNet's layer2 and layer3 (layer4's
# pooled map is the head's input); LeNet's two convolutions (its head reads fc2's 84 features): on
# the five real folds they raise LeNet's AUROC against the non-skin pictures from 0.68 to 0.86
# (README, "Out of distribution"). Other families: the head's input alone. NCHW outputs, pooled over
# their last two dims.
OOD_LAYERS = [("lenet", ("relu1", "relu2")), ("resnet", ("layer2", "layer3")), ("resnext", ("layer2", "layer3")),
              ("wide_resnet", ("layer2", "layer3"))]


def _of_family(table: list, name: str) -> tuple:
    """The layers a (name prefix, layers) table gives the network `name`; none if its family is absent."""
    return next((layers for prefix, layers in table if name.startswith(prefix)), ())


class Classifier(nn.Module):
    """backbone (image -> pooled features) + linear head, with the facts other scripts need:
    `name`, `input_size`, `num_features`, `cam_layer` (a submodule path), `cam_layout`,
    `cam_candidates` (the layers worth explaining with, the default among them) and `ood_layers`
    (the earlier stages whose pooled maps the out-of-distribution score reads beside the head's input)."""

    def __init__(self, name: str, backbone: nn.Module, num_features: int, num_classes: int, input_size: int):
        super().__init__()
        self.name, self.input_size, self.num_features = name, input_size, num_features
        self.backbone = backbone
        self.head = nn.Linear(num_features, num_classes)
        layer, self.cam_layout = next(((p, lay) for prefix, p, lay in CAM_LAYERS if name.startswith(prefix)),
                                      (None, None))
        self.cam_layer = self._resolve(f"backbone.{layer}") if layer else None
        self.cam_candidates = [f"backbone.{n}" for n in _of_family(CAM_CANDIDATES, name)] or [self.cam_layer]
        self.ood_layers = [f"backbone.{n}" for n in _of_family(OOD_LAYERS, name)]

    def _resolve(self, path: str) -> str:
        head, sep, tail = path.partition(".[-1]")
        if not sep:
            return path
        last = list(self.get_submodule(head).named_children())[-1][0]
        return self._resolve(f"{head}.{last}{tail}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, num_features): for linear probes, k-NN and SVMs."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _torchvision_backbone(name: str, weights):
    """A torchvision classifier with its last Linear replaced by Identity: it now returns features."""
    import torchvision
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise ModelError(f"could not download ImageNet weights for {name} ({getattr(e, 'reason', e)}); "
                         "connect to the internet once, or use --init none or a local .pt") from None
    head_name, head = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent, _, attr = head_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
    size = getattr(model, "image_size", None) or \
        torchvision.models.get_model_weights(name).DEFAULT.transforms.keywords.get("crop_size", 224)
    return model, head.in_features, int(size), head_name


# --input-size's type in train.py and simclr.py: MSLD's photos are 224 px a side (300 at most), so a
# larger input only upscales them, and 1024 keeps the decoded cache of all 755 within 2.4 GB
INPUT_SIZE = Number(int, 1, 1024)
FIXED_SIZE = ("lenet", "vit", "maxvit")  # fully connected layers, position embeddings, windows fix their input size


def build_model(name: str, num_classes: int, init: str = "none", input_size: int | None = None) -> Classifier:
    """`init`: 'none' (random), 'imagenet' (torchvision weights; downloads once), or a .pt path
    (our classifier or SimCLR encoder checkpoint, or a torchvision state_dict).
    `input_size` overrides the native size (convolutional networks pool globally: any size works)."""
    name = name.lower()
    if name == "lenet":
        if init == "imagenet":
            raise ModelError("--init imagenet: LeNet has no ImageNet weights; use --init none")
        model = Classifier(name, LeNet(), LeNet.num_features, num_classes, LeNet.input_size)
    elif name not in model_names():
        why = f" ({UNSUPPORTED[name]})" if name in UNSUPPORTED else ""
        raise ModelError(f"--model {name}: unknown or unsupported model{why}; choose lenet, resnext101_64x4d, "
                         "resnet18, resnet50, efficientnet_b0, convnext_tiny, vit_b_16, swin_t, ... "
                         "(any torchvision classification model)")
    else:
        backbone, features, size, head_name = _torchvision_backbone(name, "DEFAULT" if init == "imagenet" else None)
        model = Classifier(name, backbone, features, num_classes, size)
        model.torchvision_head = head_name  # where a raw torchvision state_dict keeps its 1000-class head
    if input_size is not None and input_size != model.input_size:
        if name.startswith(FIXED_SIZE):
            raise ModelError(f"--input-size {input_size}: {name} needs {model.input_size}x{model.input_size} inputs; "
                             "leave --input-size out")
        if input_size < 32:
            raise ModelError(f"--input-size {input_size}: {name} needs at least 32x32 inputs (its stride-2 stages)")
        model.input_size = input_size
    if init not in ("none", "imagenet"):
        print(f"init: {load_weights(model, load_checkpoint(init), init)}")
    return model


def _check_header(ckpt: dict, path) -> None:
    """What a classifier checkpoint says of itself beyond what every checkpoint says (load_checkpoint
    checks that), checked before anything is built from it."""
    classes, size, temperature = ckpt.get("classes"), ckpt.get("input_size"), ckpt.get("temperature")
    refusals = [
        (not (isinstance(classes, list) and len(classes) >= 2 and len(set(map(str, classes))) == len(classes)
              and all(isinstance(c, str) and c for c in classes)),
         f"its classes {classes!r} are not two or more distinct names"),
        (size is not None and not (type(size) is int and 1 <= size <= INPUT_SIZE.high),
         f"its input size {size!r} is not a whole number from 1 to {INPUT_SIZE.high}"),
        (not isinstance(ckpt.get("ood", {}), dict), "its out-of-distribution reference is not a dict"),
    ]
    refuse_first(refusals, path)
    if temperature is not None and not (type(temperature) in (int, float) and math.isfinite(temperature)
                                        and temperature > 0):
        raise ModelError(f"{path}: its temperature is {temperature!r}, not a positive number; retrain, or delete "
                         "the key to serve uncalibrated probabilities")


def load_classifier(path, rt) -> tuple[Classifier, dict]:
    """A trained classifier checkpoint (best.pt) -> (model in eval mode, placed by the runtime `rt`
    (models.Runtime: its device and memory format), checkpoint dict)."""
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != "classifier" or "classes" not in ckpt:
        what = "a SimCLR encoder: fine-tune it with `train.py --init` first" if ckpt.get("kind") == "encoder" \
            else "not a classifier checkpoint of this project"
        raise ModelError(f"{path}: {what}")
    _check_header(ckpt, path)
    model = build_model(ckpt["model"], len(ckpt["classes"]), input_size=ckpt.get("input_size"))
    load_state(model, ckpt["state_dict"], path, "classifier")  # a head that does not fit: refused, not re-initialised
    if not all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()):
        raise ModelError(f"{path}: holds weights that are not finite (NaN or inf): the run diverged; retrain it "
                         "with a lower --lr or --clip-grad 1.0")
    return rt.module(model).eval(), ckpt
