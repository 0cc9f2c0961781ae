"""Model shapes, parameter counts, gate initialisation, and the frozen parts staying frozen."""

import math

import pytest
import torch

from model.backbone import BackboneError, BackboneShape, FrozenBackbone, LazyBackbone
from model.config import BackboneConfig, ModelConfig
from model.detector import AdapterDetector


def make_detector(width=128, **kwargs):
    torch.manual_seed(0)
    return AdapterDetector(width, ModelConfig(), dropout=kwargs.pop("dropout", 0.1), gate_init_bias=kwargs.pop("gate_init_bias", 0.0), **kwargs)


def test_output_shapes_on_tiny_widths():
    detector = make_detector().eval()
    out = detector(torch.randn(5, 128), torch.randn(5, 64, 128))
    assert out.logits.shape == (5,)
    assert out.gate.shape == (5,)
    assert torch.all((out.gate > 0) & (out.gate < 1))


def test_vit_l14_widths_match_the_reference_parameter_counts():
    # Reference report: ~9.4M trainable, Stage 2 adapter ~8.3M, on CLIP ViT-L/14 (width 1024).
    counts = make_detector(width=1024).parameter_counts()
    assert 9.3e6 <= counts["trainable"] <= 9.6e6
    assert 8.2e6 <= counts["stage2 adapter"] <= 8.5e6
    assert counts["trainable"] == counts["stage2 adapter"] + counts["fusion"] + counts["head"]


@pytest.mark.parametrize("bias", [-1.0, 0.0, 1.0, 2.5])
def test_gate_starts_at_sigmoid_of_its_bias_for_every_input(bias):
    detector = make_detector(gate_init_bias=bias).eval()
    gate = detector(torch.randn(7, 128) * 3, torch.randn(7, 64, 128) * 3).gate
    torch.testing.assert_close(gate, torch.full((7,), 1 / (1 + math.exp(-bias))))


def test_head_starts_at_the_training_prior():
    detector = make_detector(prior_fake=0.8, dropout=0.0).eval()
    assert detector.head[1].bias.item() == pytest.approx(math.log(4.0))
    with pytest.raises(ValueError, match="prior_fake"):
        make_detector(prior_fake=1.0)


def test_stage1_is_frozen_and_stays_in_eval_mode():
    detector = make_detector().train()
    assert not detector.stage1.training
    assert all(not p.requires_grad for p in detector.stage1.parameters())
    out = detector(torch.randn(4, 128), torch.randn(4, 64, 128))
    out.logits.sum().backward()
    assert all(p.grad is None for p in detector.stage1.parameters())
    assert all(p.grad is not None for p in detector.stage2.parameters())


def test_optimizer_groups_cover_exactly_the_trainable_parameters():
    detector = make_detector()
    grouped = [p for params in detector.trainable_groups().values() for p in params]
    trainable = [p for p in detector.parameters() if p.requires_grad]
    assert {id(p) for p in grouped} == {id(p) for p in trainable}
    assert len(grouped) == len(trainable)


def test_tiny_backbone_is_frozen_and_returns_the_configured_layers():
    backbone = FrozenBackbone(BackboneConfig(name="fairfront-tiny-vit", weights="random", stage1_layer=-1, stage2_layer=1))
    backbone.train()  # must stay in eval mode
    assert not backbone.visual.training
    assert all(not p.requires_grad for p in backbone.parameters())
    tokens = backbone(torch.randn(3, 3, 64, 64))
    assert tokens.cls.shape == (3, 128) and tokens.patches.shape == (3, 64, 128)
    assert backbone.shape.layers == (3, 1)
    assert backbone.shape.token_shapes() == (64, 128)
    # a different layer gives different tokens: the choice is real
    other = FrozenBackbone(BackboneConfig(name="fairfront-tiny-vit", weights="random", stage2_layer=3))(torch.zeros(1, 3, 64, 64))
    same_input = backbone(torch.zeros(1, 3, 64, 64))
    assert not torch.allclose(other.patches, same_input.patches)


def test_random_backbone_weights_are_reproducible():
    config = BackboneConfig(name="fairfront-tiny-vit", weights="random", seed=3)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(FrozenBackbone(config)(x).patches, FrozenBackbone(config)(x).patches)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"name": "ViT-Nope-99"}, "unknown open_clip model"),
        ({"weights": "/nonexistent/open_clip_model.safetensors"}, "checkpoint file not found"),
        ({"stage1_layer": 4}, "out of range"),
        ({"stage2_layer": -5}, "out of range"),
        ({"name": "RN50"}, r"backbone.name: RN50 is not an open_clip VisionTransformer"),
        ({"name": "ViT-B-16-SigLIP"}, r"backbone.name: ViT-B-16-SigLIP is not an open_clip VisionTransformer"),  # (a timm tower)
    ],
)
def test_backbone_errors_name_the_key(changes, message):
    config = {"name": "fairfront-tiny-vit", "weights": "random"} | changes
    with pytest.raises(BackboneError, match=message):
        FrozenBackbone(BackboneConfig(**config))
    if "weights" not in changes:  # (a missing file is the cache key's error: weights_identity)
        with pytest.raises(BackboneError, match=message):  # the same errors before anything is built
            LazyBackbone(BackboneConfig(**config))


def test_a_weights_file_that_is_not_this_backbone_is_named_in_one_line(tmp_path):
    import torch

    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    other = tmp_path / "other.pt"
    torch.save({"fc1.weight": torch.zeros(2, 2)}, other)  # a Stage 1 adapter's keys, say
    for path in (text, other):
        with pytest.raises(BackboneError, match=rf"backbone.weights: {path} cannot be loaded as fairfront-tiny-vit weights") as err:
            FrozenBackbone(BackboneConfig(name="fairfront-tiny-vit", weights=str(path)))
        assert "\n" not in str(err.value)


def test_vit_l14_goes_through_the_same_code_path():
    # Same factory, same VisionTransformer, same token extraction as the tiny config; only the
    # numbers differ. (Random weights: ~300M parameters, a few seconds to build.)
    backbone = FrozenBackbone(BackboneConfig(name="ViT-L-14-quickgelu", weights="random", stage1_layer=-1, stage2_layer=-2))
    assert backbone.shape.token_shapes() == (256, 1024)
    assert backbone.shape.layers == (23, 22)
    assert backbone.shape.image_size == 224
    tokens = backbone(torch.zeros(1, 3, 224, 224))  # what the shape read off the config (the cache's) promised
    assert tokens.cls.shape == (1, 1024) and tokens.patches.shape == (1, 256, 1024)
    assert BackboneShape.of(backbone.config) == backbone.shape


def test_only_building_a_backbone_imports_open_clip():
    # open_clip and its torchvision take seconds to import; every `--help`, `show` and `export`
    # would pay them for nothing.
    import subprocess
    import sys

    code = ("import sys, run_study, search, search.local_workers, search.fused_batch, model.train\n"
            "print(sorted(m for m in ('open_clip', 'torchvision') if m in sys.modules))\n"
            "from model.backbone import FrozenBackbone\n"
            "from model.config import BackboneConfig\n"
            "FrozenBackbone(BackboneConfig(name='fairfront-tiny-vit', weights='random'))\n"
            "print(sorted(m for m in ('open_clip', 'torchvision') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["[]", "['open_clip', 'torchvision']"]
