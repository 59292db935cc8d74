"""Hugging Face transformers models through fxlop: what is expanded on each path, and how exactly.

Every model is built from a small config with random initialization (nothing is downloaded) and
expanded twice: without tracing (``trace=False``) and from its ``torch.export`` program. For each
path the table gives the conv/linear layers expanded out of those the model has, what was left
alone and why, the expanded model's error against the model, and the fused model's error against
the expanded one after every factor was perturbed (fp32, relative). The first column says what plain
``fxlop.expand(model)`` (symbolic tracing) does.

    python -m benchmarks.huggingface     # writes benchmarks/results/huggingface.{json,md}, seconds
"""
from __future__ import annotations

import argparse
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import transformers  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import fxlop  # noqa: E402

from . import common  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
TOKENS = dict(vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _bert():
    return transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=3, **SMALL, **TOKENS))


def _gpt2():
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, use_cache=False,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=1, use_cache=False, **SMALL,
                                                                  **TOKENS))


def _vit():
    return transformers.ViTForImageClassification(transformers.ViTConfig(image_size=16, patch_size=4, num_labels=3,
                                                                         **SMALL))


def _resnet():
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                       num_labels=3)
    return transformers.ResNetForImageClassification(config)


TEXT = {"input_ids": torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(0))}
IMAGES = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
#: name -> (builder, inputs, names of the layers that share their weight with another parameter)
ZOO = {
    "bert": (_bert, TEXT, []),
    "gpt2": (_gpt2, TEXT, ["lm_head"]),
    "llama": (_llama, TEXT, []),
    "vit": (_vit, IMAGES, []),
    "resnet": (_resnet, IMAGES, []),
}
PATHS = ("eager", "export")


def build(name: str) -> nn.Module:
    """The model ``name`` of :data:`ZOO`, the same weights every call, in eval mode."""
    torch.manual_seed(0)
    return ZOO[name][0]().eval()


def layers(model: nn.Module) -> list[str]:
    """The names of the conv/linear layers of ``model`` (Conv1D included), each once."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D)
    return [name for name, module in model.named_modules() if type(module) in kinds]


def perturb(model: nn.Module) -> None:
    """Move every parameter by 5 % of its spread (seeded), so that a fuse must carry trained factors."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator) * param.std())


def expand(model: nn.Module, path: str, inputs: dict, **options):
    """Expand ``model`` without tracing (``path="eager"``) or through its ``torch.export`` program."""
    if path == "eager":
        return fxlop.expand(model, trace=False, **options)
    return fxlop.expand(torch.export.export(model, (), inputs), **options)


def measure(name: str) -> dict:
    inputs = ZOO[name][1]
    try:
        fxlop.expand(build(name))
        traced = "expanded"
    except fxlop.FxlopError as error:
        traced = type(error).__name__
    row = {"model": name, "symbolic_trace": traced}
    for path in PATHS:
        model = build(name)
        expanded = expand(model, path, inputs, expansion=2)
        report = fxlop.report(expanded).expand
        expand_error = fxlop.verify(model, expanded, inputs)
        perturb(expanded)
        fused = fxlop.fuse(expanded)
        row[path] = {"layers": len(layers(model)), "expanded": len(report.expanded),
                     "skipped": report.skipped_reasons,
                     "expand_error": expand_error, "fuse_error": fxlop.verify(expanded, fused, inputs),
                     "same_state_dict": {k: v.shape for k, v in fused.state_dict().items()}
                     == {k: v.shape for k, v in model.state_dict().items()}}
    return row


def markdown(result: dict) -> str:
    lines = [f"transformers {result['transformers']}, models from small configs (random weights), expansion 2; "
             f"errors are fp32 relative: expanded vs model, fused vs the perturbed expanded model "
             f"({result['machine']['date']}).", "",
             "| model | `fxlop.expand(model)` | " + " | ".join(
                 f"{p}: expanded / layers | {p}: left alone | {p}: expand, fuse error" for p in PATHS) + " |",
             "|---|---|" + "---|---|---|" * len(PATHS)]
    for row in result["rows"]:
        cells = []
        for path in PATHS:
            r = row[path]
            left_alone = "; ".join(f"{k}: {v}" for k, v in r["skipped"].items()) or "-"
            cells += [f"{r['expanded']} / {r['layers']}", left_alone,
                      f"{r['expand_error']:.1e}, {r['fuse_error']:.1e}"]
        lines.append(f"| {row['model']} | {row['symbolic_trace']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="default: " + ", ".join(ZOO))
    parser.add_argument("--name", default="huggingface")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in ZOO]
    if unknown:
        parser.error(f"unknown models {unknown}: choose from {list(ZOO)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = [measure(name) for name in (args.models or ZOO)]
    result = {"rows": rows, "transformers": transformers.__version__, "machine": common.machine()}
    table = markdown(result)
    common.write(args.name, result, table)
    print(table)
    return result


if __name__ == "__main__":
    main()
