"""SegNet structure and index-based unpooling, MONAI classifiers, and chunked attention MIL."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedscan.common.models import mil
from fedscan.common.models.classifiers import build_densenet121, build_resnet18
from fedscan.common.models.mil import AttentionMIL
from fedscan.common.models.segnet import SegNet, build_segnet

VGG16_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


# --- SegNet -------------------------------------------------------------------------------------


def test_segnet_output_shape() -> None:
    torch.manual_seed(0)
    model = build_segnet(1, 3, width=0.125).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 3, 64, 64)


def test_segnet_sizes_not_multiple_of_32() -> None:
    model = build_segnet(2, 2, width=0.125).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 2, 45, 50))
    assert out.shape == (1, 2, 45, 50)


def test_segnet_is_vgg16_encoder_with_mirrored_decoder() -> None:
    model = SegNet(in_channels=1, out_channels=5, width=1.0)
    encoder_convs = model.encoder_convs()
    assert len(encoder_convs) == 13
    assert tuple(c.out_channels for c in encoder_convs) == VGG16_CHANNELS
    assert encoder_convs[0].in_channels == 1
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in encoder_convs)
    assert [len(_convs(stage)) for stage in model.encoder] == [2, 2, 3, 3, 3]
    assert len(_convs(model.encoder)) == 13

    decoder_convs = _convs(model.decoder)
    assert len(decoder_convs) == 13
    assert len(_convs(model)) == 26
    # Deepest stage first; the decoder mirrors the encoder's channel plan back to 64, then logits.
    assert [len(_convs(stage)) for stage in model.decoder] == [3, 3, 3, 2, 2]
    assert tuple(c.in_channels for c in decoder_convs) == VGG16_CHANNELS[::-1]
    assert tuple(c.out_channels for c in decoder_convs) == VGG16_CHANNELS[::-1][1:] + (5,)
    assert isinstance(model.decoder[-1][-1], nn.Conv2d)  # logits: no BN or ReLU after the last conv

    assert not any(isinstance(m, (nn.ConvTranspose2d, nn.Upsample)) for m in model.modules())
    assert len(model.pools) == len(model.unpools) == 5
    assert all(isinstance(p, nn.MaxPool2d) and p.return_indices for p in model.pools)
    assert all(isinstance(u, nn.MaxUnpool2d) for u in model.unpools)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 25


def test_segnet_full_width_small_forward() -> None:
    model = SegNet(width=1.0).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 32, 32))
    assert out.shape == (1, 2, 32, 32)


def test_segnet_decoder_unpools_with_encoder_indices() -> None:
    torch.manual_seed(0)
    model = build_segnet(1, 2, width=0.125).eval()
    pool_indices: dict[int, torch.Tensor] = {}
    unpool_indices: dict[int, torch.Tensor] = {}
    unpool_io: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def pool_hook(i: int):
        return lambda module, args, output: pool_indices.__setitem__(i, output[1])

    def unpool_pre_hook(j: int):
        return lambda module, args: unpool_indices.__setitem__(j, args[1])

    def unpool_hook(j: int):
        return lambda module, args, output: unpool_io.__setitem__(j, (args[0], output))

    handles = [p.register_forward_hook(pool_hook(i)) for i, p in enumerate(model.pools)]
    handles += [u.register_forward_pre_hook(unpool_pre_hook(j)) for j, u in enumerate(model.unpools)]
    handles += [u.register_forward_hook(unpool_hook(j)) for j, u in enumerate(model.unpools)]
    with torch.no_grad():
        model(torch.randn(2, 1, 64, 96))
    for h in handles:
        h.remove()

    assert sorted(pool_indices) == sorted(unpool_indices) == sorted(unpool_io) == [0, 1, 2, 3, 4]
    for j in range(5):
        assert torch.equal(unpool_indices[j], pool_indices[4 - j])  # unpools[j] undoes pools[4 - j]
        # Values land exactly at the argmax positions of that pooling and nowhere else.
        x, out = unpool_io[j]
        flat_out, flat_idx = out.flatten(2), unpool_indices[j].flatten(2)
        assert torch.equal(flat_out.gather(2, flat_idx), x.flatten(2))
        at_indices = torch.zeros_like(flat_out, dtype=torch.bool).scatter_(2, flat_idx, True)
        assert not flat_out[~at_indices].any()
        assert flat_out.any()


# --- classifiers --------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [build_densenet121, build_resnet18])
def test_classifier_logits_shape(build) -> None:
    torch.manual_seed(0)
    model = build(1, 4).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 4)
    assert torch.isfinite(out).all()


# --- attention MIL ------------------------------------------------------------------------------


def _mil(chunk_size: int) -> AttentionMIL:
    torch.manual_seed(0)
    return AttentionMIL(
        in_channels=1, num_classes=3, base_channels=4, feature_dim=16, attention_dim=8, chunk_size=chunk_size
    )


def test_mil_bags_of_any_length() -> None:
    model = _mil(16).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for n in (1, 7, 70):
            logits, attention = model(torch.randn(n, 1, 32, 32))
            assert logits.shape == (3,)
            assert attention.shape == (n,)
            assert (attention >= 0).all()
            assert attention.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_mil_batch_norm_sees_the_batch_in_training_and_running_statistics_in_evaluation() -> None:
    # training: the exams of a batch are normalized together, so one exam's output depends on the
    # others; evaluation: running statistics, so it depends on that exam only, whatever the chunking
    model = _mil(16)
    torch.manual_seed(2)
    bag, other, third = torch.randn(6, 1, 32, 32), torch.randn(5, 1, 32, 32), 3 + torch.randn(5, 1, 32, 32)
    with torch.no_grad():
        model.train()
        with_other, _ = model.forward_bags([bag, other])
        with_third, _ = model.forward_bags([bag, third])
        model.eval()
        alone, _ = model(bag)
        in_batch, _ = model.forward_bags([bag, third])
        model.chunk_size = 2
        chunked, _ = model(bag)
    assert not torch.allclose(with_other[0], with_third[0], atol=1e-4)
    torch.testing.assert_close(in_batch[0], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked, alone, atol=1e-5, rtol=0)
    assert any(name.endswith("running_mean") for name, _ in model.named_buffers())


def test_mil_long_exam_is_split_into_equal_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = []
    model = _mil(16).eval()
    real = model.encoder.forward
    monkeypatch.setattr(model.encoder, "forward", lambda x: (sizes.append(len(x)), real(x))[1])
    with torch.no_grad():
        model(torch.randn(40, 1, 32, 32))
    assert sizes == [14, 13, 13]  # 40 images, at most 16 at once: 3 equal chunks, not 16+16+8


def test_mil_checkpointed_gradients_match(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    torch.manual_seed(3)
    bag = torch.randn(40, 1, 32, 32)
    target = torch.tensor([2])
    chunked = _mil(16).train()
    plain = copy.deepcopy(chunked)
    # reference: the same chunks, encoded without checkpointing
    monkeypatch.setattr(mil, "checkpoint", lambda fn, x, **kw: fn(x))
    logits, _ = plain(bag)
    F.cross_entropy(logits[None], target).backward()
    monkeypatch.setattr(mil, "checkpoint", counting_checkpoint)
    logits, _ = chunked(bag)
    F.cross_entropy(logits[None], target).backward()
    assert calls == [False, False, False]  # 40 images in 3 chunks, each checkpointed

    for (name, a), b in zip(chunked.named_parameters(), plain.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=0, msg=name)
    assert chunked.encoder.features[0].conv.weight.grad.abs().sum() > 0

    calls.clear()
    with torch.no_grad():
        chunked(bag)
    assert calls == []


def test_mil_checkpointing_keeps_few_activations_for_backward() -> None:
    def saved_bytes(model: AttentionMIL, bag: torch.Tensor) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(bag)
        return total

    model = _mil(16).train()
    bag = torch.randn(64, 1, 32, 32)
    chunked = saved_bytes(model, bag)
    model.chunk_size = 1000
    whole = saved_bytes(model, bag)
    # Checkpointed chunks keep only their inputs; unchunked keeps every image's activations.
    assert chunked < 0.25 * whole


def test_mil_rejects_empty_bag() -> None:
    model = _mil(16)
    with pytest.raises(ValueError, match="empty bag"):
        model(torch.zeros(0, 1, 32, 32))
    with pytest.raises(ValueError, match="empty bag"):
        model.forward_bags([torch.zeros(2, 1, 32, 32), torch.zeros(0, 1, 32, 32)])


def test_mil_forward_bags() -> None:
    model = _mil(4).eval()
    torch.manual_seed(4)
    bags = [torch.randn(n, 1, 32, 32) for n in (3, 1, 9)]
    with torch.no_grad():
        logits, attentions = model.forward_bags(bags)
        single = [model(bag) for bag in bags]
    assert logits.shape == (3, 3)
    assert [a.shape for a in attentions] == [(3,), (1,), (9,)]
    for i, (one_logits, one_attention) in enumerate(single):
        torch.testing.assert_close(logits[i], one_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(attentions[i], one_attention, atol=1e-5, rtol=0)
