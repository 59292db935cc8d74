"""Hugging Face transformers models (issue 14): eager and torch.export, built from small configs.

Nothing is downloaded: every model is made from a config with random initialization, and the hub is
offline.  Each model is expanded without tracing (``trace=False``) and from its ``torch.export``
program; every conv/linear that does not share its weight is expanded, the expanded model computes
what the model computes, and after its factors are perturbed it fuses back to its own state_dict
keys and shapes and computes what the perturbed expanded model computes (fp32, 1e-5 relative).
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import fxlop  # noqa: E402
from fxlop.passes import ExpandedLayer  # noqa: E402

from conftest import FP32_RTOL  # noqa: E402

transformers = pytest.importorskip("transformers")
from benchmarks import huggingface  # noqa: E402
from benchmarks.huggingface import IMAGES, SMALL, TEXT, TOKENS, ZOO  # noqa: E402

_model, _layers, _perturb, _expand = huggingface.build, huggingface.layers, huggingface.perturb, huggingface.expand


def _shapes(model):
    return {key: value.shape for key, value in model.state_dict().items()}


@pytest.mark.parametrize("path", ["eager", "export"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_expands_every_untied_layer_and_round_trips(name, path):
    model = _model(name)
    inputs, tied = ZOO[name][1], ZOO[name][2]
    before = {key: value.clone() for key, value in model.state_dict().items()}
    expanded = _expand(model, path, inputs, expansion=2)
    report = fxlop.report(expanded).expand
    # eager layers are named by module, exported ones by their weight parameter
    suffix = "" if path == "eager" else ".weight"
    expandable = [f"{n}{suffix}" for n in _layers(model) if n not in tied]
    assert sorted(e.name for e in report.expanded) == sorted(expandable)
    assert {s.name: s.reason for s in report.skipped} == {
        f"{n}{suffix}": "its weight is tied to 'transformer.wte.weight'" for n in tied}
    assert fxlop.verify(model, expanded, inputs) <= FP32_RTOL

    _perturb(expanded)
    fused = fxlop.fuse(expanded)
    assert not any(isinstance(m, ExpandedLayer) for m in fused.modules())
    assert _shapes(fused) == _shapes(model)
    assert fxlop.verify(expanded, fused, inputs) <= FP32_RTOL
    for key, value in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(value, before[key]), key


def test_gpt2_conv1d_expands_and_fuses_back_to_conv1d_with_its_tie():
    model = _model("gpt2")
    expanded = fxlop.expand(model, trace=False, expansion=2)
    attention = expanded.transformer.h[0].attn.c_attn
    assert isinstance(attention, ExpandedLayer) and attention.transposed_weight
    # it still reads like the Conv1D it replaced: (in, out) weight, bias, nf and nx
    original = model.transformer.h[0].attn.c_attn
    assert (attention.nf, attention.nx) == (original.nf, original.nx) == (96, 32)
    assert attention.weight.shape == original.weight.shape == (32, 96)
    assert (attention.weight - original.weight).abs().max() <= FP32_RTOL * original.weight.abs().max()
    assert torch.equal(attention.bias, original.bias)
    # the tie is kept: lm_head is not expanded and still is the token embedding
    assert expanded.lm_head.weight is expanded.transformer.wte.weight

    _perturb(expanded)
    fused = fxlop.fuse(expanded)
    assert [type(m) for m in fused.modules()] == [type(m) for m in model.modules()]
    assert fused.lm_head.weight is fused.transformer.wte.weight
    assert _shapes(fused) == _shapes(model)
    assert fxlop.verify(expanded, fused, TEXT) <= FP32_RTOL
    # the fused Conv1D holds the transpose of the composed (out, in) weight, exactly as the expanded layer reads
    layer = expanded.transformer.h[1].mlp.c_fc
    assert torch.equal(fused.transformer.h[1].mlp.c_fc.weight, layer.fused_weight())
    assert fused.transformer.h[1].mlp.c_fc.weight.shape == (32, 128)  # n_inner = 4 n_embd


def test_gpt2_export_products_fuse_back_to_parameters_of_their_shape():
    model = _model("gpt2")
    exported = torch.export.export(model, (), TEXT)
    addmms = [n for n in exported.module().graph.nodes if n.target is torch.ops.aten.addmm.default]
    assert len(addmms) == 8  # Conv1D runs as addmm(bias, x, W) on a (in, out) parameter
    expanded = fxlop.expand(exported, expansion=2)
    report = fxlop.report(expanded).expand
    assert all(e.transposed_weight for e in report.expanded)
    assert not any(n.target is torch.ops.aten.addmm.default for n in expanded.graph.nodes)
    fused = fxlop.fuse(expanded)
    assert _shapes(fused) == _shapes(exported.module())
    assert fxlop.verify(model, fused, TEXT) <= FP32_RTOL
    # the fused program exports again
    assert fxlop.verify(fused, torch.export.export(fused, (), TEXT).module(), TEXT, rtol=0) == 0


def test_vit_reads_its_patch_projection_weight_in_eager_mode():
    """ViT's embeddings read ``projection.weight.dtype``: an expanded layer must still answer ``weight``."""
    model = _model("vit")
    expanded = fxlop.expand(model, trace=False)
    projection = expanded.vit.embeddings.patch_embeddings.projection
    assert isinstance(projection, ExpandedLayer)
    assert (projection.in_channels, projection.out_channels, projection.kernel_size, projection.stride) == \
        (3, 32, (4, 4), (4, 4))
    assert fxlop.verify(model, expanded, IMAGES) <= FP32_RTOL


def test_sp_taps_of_the_expanded_eager_model_pair_with_the_dense_model():
    """The distiller needs graphs; an eagerly expanded model gets one from torch.export, which keeps its
    parameters (training the tapped student trains the expanded model) and its module names."""
    dense = _model("bert")
    expanded = fxlop.expand(dense, trace=False, expansion=2)
    names = [e.name for e in fxlop.report(expanded).expand.expanded]
    teacher = torch.export.export(dense, (), TEXT).module()
    student = torch.export.export(expanded, (), TEXT).module()
    sp = fxlop.distiller(teacher, student, taps=names)
    assert sp.names == names and len(names) == 14
    assert {id(p) for p in sp.student.parameters()} == {id(p) for p in expanded.parameters()}
    # the expansion is exact, so every pair of taps holds the same features
    _, student_taps = sp.student(**TEXT)
    teacher_taps = sp.teacher_taps(**TEXT)
    for name in names:
        scale = teacher_taps[name].abs().max()
        assert (student_taps[name] - teacher_taps[name]).abs().max() <= FP32_RTOL * scale, name
    assert sp.loss(student_taps, teacher_taps) <= 1e-10


@pytest.mark.parametrize("name", list(ZOO))
def test_default_sp_taps_on_the_export_graphs_of_the_eagerly_expanded_model(name):
    """Without ``taps=``: in the export graph of a model expanded with trace=False every expanded layer
    is a default tap under its module name, paired with the dense teacher's export graph; the tapped
    student keeps the model's keyword inputs and its ModelOutput; training it trains the model."""
    dense = _model(name)
    inputs, tied = ZOO[name][1], ZOO[name][2]
    expanded = fxlop.expand(dense, trace=False, expansion=2)
    teacher = torch.export.export(dense, (), inputs).module()
    student = torch.export.export(expanded, (), inputs).module()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every tap has its partner
        sp = fxlop.distiller(teacher, student)
    expanded_names = [e.name for e in fxlop.report(expanded).expand.expanded]
    # every expanded layer, and the conv/linear left dense (GPT-2's tied lm_head, by its weight's name)
    assert sorted(sp.names) == sorted(expanded_names + [f"{n}.weight" for n in tied])
    output, sp_loss = sp(**inputs)
    assert type(output) is type(dense(**inputs))
    assert fxlop.verify(dense, expanded, inputs) <= FP32_RTOL
    assert (output.logits - dense(**inputs).logits).abs().max() <= FP32_RTOL * dense(**inputs).logits.abs().max()
    assert sp_loss <= 1e-10  # the expansion is exact: every pair of taps holds the same features
    sp_loss.backward()
    layer = next(m for m in expanded.modules() if isinstance(m, ExpandedLayer))
    assert all(f.grad is not None for f in layer.factors)


def test_finetune_and_evaluate_take_keyword_batches():
    """Batches of (keyword inputs, labels), as Hugging Face data collators give them."""
    torch.manual_seed(0)
    config = transformers.BertConfig(num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     **SMALL, **TOKENS)
    model = fxlop.expand(transformers.BertForSequenceClassification(config), trace=False, expansion=2)
    generator = torch.Generator().manual_seed(2)
    batch = {"input_ids": torch.randint(1, 64, (6, 8), generator=generator),
             "attention_mask": (torch.rand(6, 8, generator=generator) > 0.2).long()}
    labels = torch.randint(0, 3, (6,), generator=generator)
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    expected = {"accuracy": (logits.argmax(1) == labels).float().mean().item(),
                "loss": torch.nn.functional.cross_entropy(logits, labels).item()}
    found = fxlop.evaluate(model, [(batch, labels)])
    assert found["accuracy"] == pytest.approx(expected["accuracy"]) and found["samples"] == 6
    assert found["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    result = fxlop.finetune(model, [(batch, labels)], epochs=1, lr=0.05, device="cpu", progress=False)
    # one batch: the epoch's loss is the cross-entropy at the weights it started from
    assert result.history[0]["train_loss"] == pytest.approx(expected["loss"], rel=1e-5)
    with torch.no_grad():
        assert not torch.equal(model.eval()(**batch).logits, logits)


def test_gpt2_in_place_block_keeps_conv1d_and_its_tie():
    model = _model("gpt2")
    keys = _shapes(model)
    modules = dict(model.named_modules())
    with fxlop.overparameterized(model, expansion=2) as model:
        assert isinstance(model.transformer.h[0].attn.c_attn, ExpandedLayer)
        assert model.lm_head.weight is model.transformer.wte.weight
        _perturb(model)
        expected = model(**TEXT).logits.detach()
        fused = {n: m.fused_weight() for n, m in model.named_modules() if isinstance(m, ExpandedLayer)}
    assert dict(model.named_modules()) == modules  # the same module objects, Conv1D included
    assert _shapes(model) == keys
    assert model.lm_head.weight is model.transformer.wte.weight
    for name, weight in fused.items():
        assert torch.equal(model.get_submodule(name).weight, weight), name
    assert (model(**TEXT).logits - expected).abs().max() <= FP32_RTOL * expected.abs().max()


def test_export_path_taps_pair_by_default():
    dense = _model("bert")
    exported = torch.export.export(dense, (), TEXT)
    student = fxlop.expand(exported, expansion=2)
    sp = fxlop.distiller(exported.module(), student)
    assert sorted(sp.names) == sorted(e.name for e in fxlop.report(student).expand.expanded)


def test_untraceable_models_keep_raising_a_trace_error_that_names_both_ways_out():
    """The decision on falling back: expand does not switch to trace=False by itself.  What the caller
    would get differs in kind (a module copy instead of a GraphModule), and the LOP+SP workflow's next
    step needs a graph anyway: the distiller traces the same model and fails the same way."""
    model = _model("bert")
    with pytest.raises(fxlop.TraceError, match=r"trace=False.*torch\.export"):
        fxlop.expand(model)
    expanded = fxlop.expand(model, trace=False)
    with pytest.raises(fxlop.TraceError):
        fxlop.distiller(model, expanded)


def test_finetune_distills_into_a_hugging_face_model_through_a_distiller_of_its_export_graphs():
    """torch.fx cannot trace Hugging Face models: finetune takes a ready distiller of export graphs."""
    torch.manual_seed(0)
    config = transformers.BertConfig(num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     **SMALL, **TOKENS)
    dense = transformers.BertForSequenceClassification(config).eval()
    generator = torch.Generator().manual_seed(2)
    batch = {"input_ids": torch.randint(1, 64, (6, 8), generator=generator),
             "attention_mask": (torch.rand(6, 8, generator=generator) > 0.2).long()}
    labels = torch.randint(0, 3, (6,), generator=generator)
    teacher = torch.export.export(dense, (), batch).module()
    students, distillers = [], []
    for _ in range(2):  # the same start twice: trained with SP, and without
        student = fxlop.expand(dense, trace=False, expansion=2)
        torch.manual_seed(1)
        _perturb(student)
        students.append(student)
        distillers.append(fxlop.distiller(teacher, torch.export.export(student, (), batch).module()))
    with torch.no_grad():
        start = distillers[0](**batch)[1].item()
    with_sp = fxlop.finetune(students[0], [(batch, labels)] * 3, teacher=distillers[0], gamma=10.0, epochs=2,
                             lr=0.02, device="cpu", progress=False)
    fxlop.finetune(students[1], [(batch, labels)] * 3, epochs=2, lr=0.02, device="cpu", progress=False)
    assert with_sp.taps == distillers[0].names and with_sp.history[0]["train_sp"] > 0
    with torch.no_grad():
        after = [sp(**batch)[1].item() for sp in distillers]  # each distiller reads its student's factors
    # cross-entropy moves both away from the teacher (from start); the SP term held the distilled one closer
    assert after[0] < after[1] and start < after[1]
    with pytest.raises(fxlop.FxlopError, match="does not train this model"):
        fxlop.finetune(fxlop.expand(dense, trace=False), [(batch, labels)], teacher=distillers[0], gamma=1.0, epochs=1)


def test_benchmark_table_is_its_json(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface.common, "RESULTS", tmp_path)
    result = huggingface.main(["gpt2"])
    (row,) = result["rows"]
    assert row["symbolic_trace"] == "TraceError"
    for path in huggingface.PATHS:
        assert (row[path]["expanded"], row[path]["layers"]) == (8, 9) and len(row[path]["skipped"]) == 1
        assert row[path]["expand_error"] <= FP32_RTOL and row[path]["fuse_error"] <= FP32_RTOL
        assert row[path]["same_state_dict"]
    assert (tmp_path / "huggingface.md").read_text() == huggingface.markdown(result) + "\n"
