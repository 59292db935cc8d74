"""Model families beyond classification (issue 25): detectors, segmentation, video, optical flow and
Hugging Face audio, encoder-decoder and multimodal models, eager and through torch.export.

The models are the small ones of ``benchmarks/families.py`` (random weights, BatchNorm statistics
measured on random images, nothing downloaded).  Detectors select and reorder boxes after their
layers (NMS, top-k, score thresholds), so ``fxlop.verify`` is checked on them both ways: an exact
expansion passes even where its boxes come out in a different order, and one wrong factor of a head
fails, naming its layer, even where the boxes hide it.
"""
import os
import re
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fxlop  # noqa: E402
from fxlop.passes import ExpandedLayer  # noqa: E402

from benchmarks import families  # noqa: E402

FP32_RTOL = 1e-5


def _factor_times(model, name: str, scale: float) -> None:
    with torch.no_grad():
        model.get_submodule(name).factors[0].mul_(scale)


def _last_regression_layer(model) -> str:
    return [n for n, m in model.named_modules() if isinstance(m, ExpandedLayer) and "regression" in n][-1]


@pytest.fixture(scope="module")
def retinanet():
    """An (unpruned) ResNet-18 FPN RetinaNet on one 128-pixel image on which its exact expansion's boxes
    come out reordered (scores that differ in the seventh digit), which made verify fail: of image
    seeds 0-11, seed 6 does that (torch 2.14.1, CPU); the others give the same boxes to 8e-6."""
    torch.manual_seed(0)
    model = families.calibrate(families.retinanet(128, pruned=False), families._images(4, 128, seed=2))
    return model, fxlop.expand(model, trace=False, expansion=2), families._images(1, 128, seed=6)


@pytest.fixture(scope="module")
def ssdlite():
    model = families.build("ssdlite320_mobilenet_v3_large")
    return model, fxlop.expand(model, trace=False, expansion=2), families._images(1)


def test_exact_retinanet_expansion_passes_though_its_boxes_are_reordered(retinanet):
    model, expanded, images = retinanet
    with torch.no_grad():
        assert len(model(images)[0]["boxes"]) == 100
    # the final outputs alone: here selection turns rounding into different boxes (the failure).
    # Whether it does depends on the last digits, so on the CPU's kernels: where it does not, the
    # reordering is still covered exactly by test_verify's test_exact_layers_pass_when_selection_reorders_the_outputs
    try:
        fxlop.verify(model, expanded, (images,), layers=False)
        reordered = False
    except fxlop.EquivalenceError as error:
        assert re.search(r"output\[0\]\['(boxes|scores|labels)'\]", str(error)), error
        reordered = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fxlop.verify(model, expanded, (images,)) <= FP32_RTOL
    said = [str(w.message) for w in caught if "every compared module agreed" in str(w.message)]
    assert bool(said) == reordered, said
    if reordered:
        assert re.search(r"select or reorder by floating-point values \(.*(topk|nms)", said[0]), said[0]


@pytest.mark.parametrize("detector", ["retinanet", "ssdlite"])
def test_a_wrong_box_regression_factor_fails_naming_its_layer(detector, request):
    model, expanded, images = request.getfixturevalue(detector)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert fxlop.verify(model, expanded, (images,)) <= FP32_RTOL
    layer = _last_regression_layer(expanded)
    _factor_times(expanded, layer, 1.5)  # that head's output off by 50 %
    try:
        if detector == "ssdlite":  # the final boxes hide it: compared alone they "agree"
            assert fxlop.verify(model, expanded, (images,), layers=False) <= FP32_RTOL
        with pytest.raises(fxlop.EquivalenceError,
                           match=rf"^the models diverge at layer '{re.escape(layer)}': its output\[.*relative 0\.5\b"):
            fxlop.verify(model, expanded, (images,))
    finally:
        _factor_times(expanded, layer, 1 / 1.5)


def test_a_detector_that_keeps_no_box_is_compared_by_its_layers(ssdlite):
    model, expanded, images = ssdlite
    threshold = model.score_thresh
    model.score_thresh = expanded.score_thresh = 0.9  # the default 0.001 keeps boxes of a random net
    try:
        with torch.no_grad():
            assert len(model(images)[0]["boxes"]) == 0
        with pytest.raises(fxlop.EquivalenceError, match="nothing to compare"):
            fxlop.verify(model, expanded, (images,), layers=False)  # empty against empty said "equivalent"
        assert fxlop.verify(model, expanded, (images,)) <= FP32_RTOL  # the layers were compared
        layer = _last_regression_layer(expanded)
        _factor_times(expanded, layer, 1.5)
        try:
            with pytest.raises(fxlop.EquivalenceError, match=rf"diverge at layer '{re.escape(layer)}'"):
                fxlop.verify(model, expanded, (images,))
        finally:
            _factor_times(expanded, layer, 1 / 1.5)
    finally:
        model.score_thresh = expanded.score_thresh = threshold


#: what each path must give: the number of layers left dense (tied weights) or the error it raises
TIED = {"whisper": 1, "t5": 1}
GRAPH_TRACES = {"lraspp_mobilenet_v3_large", "r2plus1d (1 block a stage, pruned 75 %)"}
EXPORTS = GRAPH_TRACES | {"raft_small (2 updates)", "wav2vec2 (CTC)", "whisper", "t5", "clip"}
CASES = [(name, path) for name in families.FAMILIES for path in families.PATHS
         if path == "eager" or (path == "graph" and name in GRAPH_TRACES) or (path == "export" and name in EXPORTS)]


@pytest.mark.parametrize("name,path", CASES, ids=[f"{n.split()[0]}-{p}" for n, p in CASES])
def test_family_round_trips(name, path):
    row = families.measure_path(name, path)
    assert "expand_error" not in row and "fuse_error" not in row, row
    assert row["expanded"] == row["expandable"] - TIED.get(name, 0), row
    assert row["expand_rel"] <= FP32_RTOL and row["fuse_rel"] <= FP32_RTOL, row
    if path != "export":  # a fused export graph is a graph: its parameters are named differently
        assert row["same_state_dict"], row


@pytest.mark.parametrize("name", [n for n in families.FAMILIES if n not in GRAPH_TRACES])
def test_untraceable_families_say_so(name):
    row = families.measure_path(name, "graph")
    assert row["expand_error"].startswith("TraceError: torch.fx could not trace"), row
