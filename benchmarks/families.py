"""Model families beyond classification: expanded / expandable layers and round-trip errors per path.

torchvision segmentation, detection (Faster R-CNN, RetinaNet, SSDlite, FCOS, Mask R-CNN), video and
optical flow; Hugging Face audio (wav2vec2, Whisper), encoder-decoder (T5) and multimodal (CLIP).
Every model is built small (mobile or ResNet-18 backbones, few classes, small images, Hugging Face
models from tiny configs) with random weights: nothing is downloaded.  BatchNorm statistics are
measured on a few random images first (see ``calibrate``), so that the outputs depend on the input.
Detectors keep every box (``score_thresh=0``).

Each model is tried on three paths: ``graph`` (``fxlop.expand(model)``: symbolic tracing),
``eager`` (``fxlop.expand(model, trace=False)``) and ``export`` (``torch.export.export`` first).  For
each the row gives the layers expanded out of the expandable ones (conv/linear modules), the
expanded model's error against the model (``fxlop.verify``, which compares every layer and the
final outputs), then, after every factor was perturbed, the fused model's error against the perturbed
expanded model, the seconds the path took, and the first line of any error.

    python -m benchmarks.families            # writes benchmarks/results/zoo_families.{json,md}
    python -m benchmarks.families retinanet ssdlite
    python -m benchmarks.families --merge PART1 PART2   # join runs of parts (each under ~3 minutes)
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import fxlop  # noqa: E402
from fxlop.passes import ExpandedLayer, is_expandable  # noqa: E402

from . import common  # noqa: E402

PATHS = ("graph", "eager", "export")
SIDE = 64
EXPANSION = 2


def _images(n: int, side: int = SIDE, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, side, side, generator=generator) for _ in range(n)]


def calibrate(model: nn.Module, *inputs) -> nn.Module:
    """BatchNorm running statistics measured on ``inputs`` (the rest of the model in eval mode): with
    the initial statistics a random detector's signal fades to ~1e-28 and every box looks alike."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    with torch.no_grad():
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        model(*inputs)
    return model.eval()


def _fpn_resnet18(out_channels: int = 32, p6p7: bool = True, pruned: bool = True):
    """ResNet-18 with an FPN: on layer2-4 plus P6, P7 (RetinaNet, FCOS), or on layer1-4 plus a pooled
    level (the five maps Faster/Mask R-CNN's default anchors and RoI pooling expect)."""
    import torchvision
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

    body = pruned_resnet18() if pruned else torchvision.models.resnet18()
    widths = [stage[-1].conv2.out_channels for stage in (body.layer1, body.layer2, body.layer3, body.layer4)]
    if p6p7:
        return BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, widths[1:], out_channels,
                               extra_blocks=LastLevelP6P7(out_channels, out_channels))
    return BackboneWithFPN(body, {f"layer{i + 1}": str(i) for i in range(4)}, widths, out_channels,
                           extra_blocks=LastLevelMaxPool())


def pruned_resnet18(ratio: float = 0.75):
    """torchvision's ResNet-18 with ``ratio`` of its channels pruned by torch-pruning (a quarter of the
    widths: 16-128), as a detector backbone of fxlop's users would be."""
    import torch_pruning as tp
    import torchvision

    body = torchvision.models.resnet18().eval()
    tp.pruner.BasePruner(body, torch.rand(1, 3, 64, 64), importance=tp.importance.GroupMagnitudeImportance(p=2),
                         pruning_ratio=ratio, ignored_layers=[body.fc]).step()
    return body


DETECTION = dict(num_classes=3, min_size=SIDE, max_size=SIDE)


def retinanet(side: int = SIDE, pruned: bool = True):
    """RetinaNet on a pruned ResNet-18 FPN of 32 channels (the ResNet-50 builder's head, 9 anchors a place)."""
    from torchvision.models.detection import RetinaNet

    return RetinaNet(_fpn_resnet18(pruned=pruned), num_classes=3, min_size=side, max_size=side, score_thresh=0.0,
                     detections_per_img=100)


def ssdlite():
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3, score_thresh=0.0,
                                          detections_per_img=100)
    model.transform.min_size, model.transform.max_size = (128,), 128  # the builder fixes 320
    return model


def _rcnn_heads(channels: int = 32, hidden: int = 64) -> dict:
    """Box heads of ``hidden`` features (the builders' are 1024 wide, for 256-channel FPNs)."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    return dict(box_head=TwoMLPHead(channels * 7 * 7, hidden), box_predictor=FastRCNNPredictor(hidden, 3),
                num_classes=None, min_size=SIDE, max_size=SIDE, box_score_thresh=0.0, rpn_pre_nms_top_n_test=100,
                rpn_post_nms_top_n_test=50, box_detections_per_img=20)


def faster_rcnn():
    """Faster R-CNN on a pruned ResNet-18 FPN of 32 channels, box head of 64 features."""
    from torchvision.models.detection import FasterRCNN

    return FasterRCNN(_fpn_resnet18(p6p7=False), **_rcnn_heads())


def fcos():
    from torchvision.models.detection import FCOS

    # FCOS's head normalizes each channel over its place (GroupNorm of one channel a group), which
    # needs more than one place: FPN levels at strides 4-64 and 128-pixel images (64 would give 1 x 1)
    return FCOS(_fpn_resnet18(p6p7=False), score_thresh=0.0, detections_per_img=50,
                **{**DETECTION, "min_size": 128, "max_size": 128})


def mask_rcnn():
    """Mask R-CNN on a pruned ResNet-18 FPN of 32 channels, box head of 64 features, mask head of two
    32-channel convs (the builder's has four of 256)."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    return MaskRCNN(_fpn_resnet18(p6p7=False), mask_head=MaskRCNNHeads(32, [32, 32], 1),
                    mask_predictor=MaskRCNNPredictor(32, 32, 3), **_rcnn_heads())


def lraspp():
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    return lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)


def video_resnet():
    """An R(2+1)D ResNet of one block per stage (torchvision's ``r2plus1d_18`` has two), pruned 75 % with
    torch-pruning (as fxlop's users would have it; dense, its 512-channel (2+1)D convs take 15-35 s
    a path on two cores)."""
    import torch_pruning as tp
    from torchvision.models.video.resnet import BasicBlock, Conv2Plus1D, R2Plus1dStem, VideoResNet

    model = VideoResNet(BasicBlock, [Conv2Plus1D] * 4, [1, 1, 1, 1], R2Plus1dStem, num_classes=3).eval()
    tp.pruner.BasePruner(model, torch.rand(1, 3, 4, 32, 32), importance=tp.importance.GroupMagnitudeImportance(p=2),
                         pruning_ratio=0.75, ignored_layers=[model.fc]).step()
    return model


def raft():
    from torchvision.models.optical_flow import raft_small

    return raft_small(weights=None)


def _hf():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def wav2vec2():
    t = _hf()
    config = t.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4), num_feat_extract_layers=2,
                              num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4, vocab_size=16)
    return t.Wav2Vec2ForCTC(config)


def whisper():
    t = _hf()
    config = t.WhisperConfig(vocab_size=64, num_mel_bins=8, d_model=32, encoder_layers=2, decoder_layers=2,
                             encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                             decoder_ffn_dim=64, max_source_positions=8, max_target_positions=16, pad_token_id=0,
                             bos_token_id=0, eos_token_id=0, decoder_start_token_id=0, use_cache=False)
    return t.WhisperForConditionalGeneration(config)


def t5():
    t = _hf()
    config = t.T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, use_cache=False)
    return t.T5ForConditionalGeneration(config)


def clip():
    t = _hf()
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                  patch_size=4)
    return t.CLIPModel(t.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


def _tokens(shape, high=64, seed=0):
    return torch.randint(2, high, shape, generator=torch.Generator().manual_seed(seed))


#: name -> (family, builder, inputs() -> (args, kwargs), calibration inputs() or None)
FAMILIES = {
    "lraspp_mobilenet_v3_large": ("segmentation", lraspp, lambda: ((torch.stack(_images(2)),), {}),
                                  lambda: (torch.stack(_images(4, seed=2)),)),
    "fasterrcnn (pruned ResNet-18 FPN)": ("detection", faster_rcnn, lambda: ((_images(1),), {}),
                                              lambda: (_images(4, seed=2),)),
    "retinanet (pruned ResNet-18 FPN)": ("detection", retinanet, lambda: ((_images(1),), {}), lambda: (_images(4, seed=2),)),
    "ssdlite320_mobilenet_v3_large": ("detection", ssdlite, lambda: ((_images(1),), {}),
                                      lambda: (_images(4, seed=2),)),
    "fcos (pruned ResNet-18 FPN)": ("detection", fcos, lambda: ((_images(1, 128),), {}),
                                    lambda: (_images(4, 128, seed=2),)),
    "maskrcnn (pruned ResNet-18 FPN)": ("detection", mask_rcnn, lambda: ((_images(1),), {}), lambda: (_images(4, seed=2),)),
    "r2plus1d (1 block a stage, pruned 75 %)": ("video", video_resnet,
                                   lambda: ((torch.rand(1, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1)),), {}),
                                   lambda: (torch.rand(4, 3, 4, 32, 32, generator=torch.Generator().manual_seed(2)),)),
    "raft_small (2 updates)": ("optical flow", raft,
                               lambda: ((*(torch.stack(_images(1, 128, seed=s)) for s in (1, 3)), 2), {}),
                               lambda: (torch.stack(_images(2, 128, seed=2)), torch.stack(_images(2, 128, seed=4)), 2)),
    "wav2vec2 (CTC)": ("audio", wav2vec2,
                       lambda: ((), {"input_values": torch.randn(2, 400, generator=torch.Generator().manual_seed(1))}),
                       None),
    "whisper": ("audio", whisper,
                lambda: ((), {"input_features": torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1)),
                              "decoder_input_ids": _tokens((2, 4))}), None),
    "t5": ("encoder-decoder", t5, lambda: ((), {"input_ids": _tokens((2, 8)), "decoder_input_ids": _tokens((2, 4), seed=1)}),
           None),
    "clip": ("multimodal", clip,
             lambda: ((), {"input_ids": _tokens((2, 8)),
                           "pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}),
             None),
}


def build(name: str) -> nn.Module:
    """The model ``name`` of :data:`FAMILIES`: same weights every call, BatchNorm calibrated, eval mode."""
    family, builder, _, calibration = FAMILIES[name]
    torch.manual_seed(0)
    model = builder()
    return calibrate(model, *calibration()) if calibration else model.eval()


def expandable(model: nn.Module) -> list[str]:
    """The conv/linear modules of ``model`` (what ``trace=False`` can expand), by qualified name."""
    return [n for n, m in model.named_modules() if is_expandable(m)]


def perturb_factors(model: nn.Module, scale: float = 0.05, seed: int = 1) -> int:
    """Move every factor of every expanded layer by ``scale`` of its spread; returns how many moved."""
    generator = torch.Generator().manual_seed(seed)
    moved = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".factors." in name:
                param.add_(scale * torch.randn(param.shape, generator=generator).to(param) * param.std())
                moved += 1
    return moved


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def _expand(model, path, args, kwargs):
    if path == "graph":
        return fxlop.expand(model, expansion=EXPANSION)
    if path == "eager":
        return fxlop.expand(model, trace=False, expansion=EXPANSION)
    program = torch.export.export(model, args, kwargs, strict=False)
    return fxlop.expand(program, expansion=EXPANSION)


def measure_path(name: str, path: str) -> dict:
    """One model on one path: expanded / expandable, expand and fuse errors (or why not), seconds."""
    _, _, inputs, _ = FAMILIES[name]
    model = build(name)
    args, kwargs = inputs()
    example = kwargs if kwargs else args
    row = {"path": path, "expandable": len(expandable(model))}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expanded = _expand(model, path, args, kwargs)
    except Exception as error:
        row.update(expanded=0, expand_error=_first_line(error), seconds=time.perf_counter() - start)
        return row
    report = fxlop.report(expanded).expand
    row["expanded"] = len(report.expanded) if report else 0
    row["left_dense"] = report.skipped_reasons if report else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            row["expand_rel"] = fxlop.verify(model, expanded, example)
        except Exception as error:
            row["expand_error"] = _first_line(error)
    row["selection_warning"] = any("select or reorder" in str(w.message) for w in caught)
    if "expand_error" not in row:
        perturb_factors(expanded)
        try:
            fused = fxlop.fuse(expanded)
            row["fuse_rel"] = fxlop.verify(expanded, fused, example)
            row["same_state_dict"] = ({k: v.shape for k, v in fused.state_dict().items()}
                                      == {k: v.shape for k, v in model.state_dict().items()})
        except Exception as error:
            row["fuse_error"] = _first_line(error)
    row["seconds"] = time.perf_counter() - start
    return row


def measure(name: str, paths=PATHS) -> dict:
    return {"model": name, "family": FAMILIES[name][0], "paths": {path: measure_path(name, path) for path in paths}}


def _text(error: str, limit: int = 120) -> str:
    error = error.replace("|", "\\|")
    return error if len(error) <= limit else error[: limit - 3] + "..."


def _cell(r: dict) -> str:
    if r.get("expanded", 0) == 0 and "expand_error" in r:
        return f"- | {_text(r['expand_error'])} | - | {r['seconds']:.1f}"
    expand = f"{r['expand_rel']:.1e}" if "expand_rel" in r else _text(r.get("expand_error", "-"))
    fuse = f"{r['fuse_rel']:.1e}" if "fuse_rel" in r else _text(r.get("fuse_error", "-"))
    if r.get("selection_warning"):
        expand += " (layers agree; final outputs differ after ops that select or reorder)"
    return f"{r['expanded']} / {r['expandable']} | {expand} | {fuse} | {r['seconds']:.1f}"


def markdown(result: dict) -> str:
    lines = [f"Model families beyond classification, built small with random weights, expansion {EXPANSION} "
             f"(torch {result['machine']['torch']}, {result['machine']['date']}). expanded / expandable: conv/linear "
             f"layers; expand: `fxlop.verify(model, expanded)` (every shared layer and the final outputs), or the "
             f"error; fuse: `fxlop.verify(expanded, fused)` after every factor was perturbed by 5 %; seconds: the "
             f"whole path. `python -m benchmarks.families` reproduces it.", "",
             "| model | family | path | expanded / expandable | expand (fp32 rel. error or error) | fuse | s |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        for path, r in row["paths"].items():
            lines.append(f"| {row['model']} | {row['family']} | {path} | {_cell(r)} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="default: all of " + ", ".join(FAMILIES))
    parser.add_argument("--paths", nargs="*", default=list(PATHS), choices=PATHS)
    parser.add_argument("--name", default="zoo_families")
    parser.add_argument("--merge", nargs="+", metavar="PART",
                        help="only join the rows of earlier runs' results/PART.json (in their order) into --name")
    args = parser.parse_args(argv)
    if args.merge:
        parts = [json.loads((common.RESULTS / f"{part}.json").read_text()) for part in args.merge]
        result = {"rows": [row for part in parts for row in part["rows"]], "machine": parts[0]["machine"],
                  "expansion": EXPANSION}
        common.write(args.name, result, markdown(result))
        return result
    chosen = [m for m in FAMILIES if not args.models or any(a in m for a in args.models)]
    rows = []
    for name in chosen:
        rows.append(measure(name, args.paths))
        print(rows[-1], flush=True)
    result = {"rows": rows, "machine": common.machine(), "expansion": EXPANSION}
    table = markdown(result)
    common.write(args.name, result, table)
    print(table)
    return result


if __name__ == "__main__":
    main()
