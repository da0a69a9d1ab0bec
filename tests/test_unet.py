import pytest
import torch

from pcl_hpc.config import ModelConfig
from pcl_hpc.models.unet import (
    PretrainNet,
    ProjectionHead,
    UNet,
    UNetEncoder,
    build_from_spec,
    build_pretrain_net,
    build_unet,
)



@pytest.mark.parametrize("patch", [32, 64])
def test_encoder_levels_have_documented_shapes(patch):
    enc = UNetEncoder(in_channels=1, width=4)
    feats = enc(torch.randn(2, 1, patch, patch))
    assert enc.out_channels == 64
    expected = [(2, 4 * 2**k, patch // 2**k, patch // 2**k) for k in range(4)]
    expected.append((2, 64, patch // 16, patch // 16))
    assert [tuple(f.shape) for f in feats] == expected


def test_head_and_pretrain_net_give_unit_embeddings():
    head = ProjectionHead(64, out_dim=10)
    assert head(torch.randn(3, 64, 2, 2)).shape == (3, 10)

    net = PretrainNet(width=4, in_channels=2, projection_dim=10)
    z = net(torch.randn(3, 2, 32, 32))
    assert z.shape == (3, 10)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("patch", [32, 64])
def test_unet_logits_match_input_size(patch):
    net = UNet(out_classes=5, width=4)
    x = torch.randn(2, 1, patch, patch, requires_grad=True)
    out = net(x)
    assert out.shape == (2, 5, patch, patch)
    out.sum().backward()  # the decoder is wired to the encoder's skips
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unet_rectangular_input():
    assert UNet(out_classes=2, width=4)(torch.randn(1, 1, 32, 48)).shape == (1, 2, 32, 48)


def test_pretrained_encoder_loads_into_unet():
    cfg = ModelConfig(width=4, in_channels=1, projection_dim=8)
    pre = build_pretrain_net(cfg)
    # Move BN running stats off their defaults so the copy is observable.
    pre.train()
    pre(torch.randn(4, 1, 32, 32))
    unet = build_unet(cfg, out_classes=3)
    unet.encoder.load_state_dict(pre.encoder.state_dict())  # strict: keys and shapes match exactly

    pre.eval()
    unet.eval()
    x = torch.randn(2, 1, 32, 32)
    for a, b in zip(pre.encoder(x), unet.encoder(x)):
        torch.testing.assert_close(a, b)
    assert unet(x).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("shape", [(1, 1, 40, 32), (1, 1, 32, 20), (1, 1, 8, 8)])
def test_size_not_divisible_by_16_is_refused(shape):
    with pytest.raises(ValueError, match="multiples of 16"):
        UNet(out_classes=2, width=4)(torch.randn(*shape))
    with pytest.raises(ValueError, match="multiples of 16"):
        PretrainNet(width=4, projection_dim=8)(torch.randn(*shape))


def test_wrong_channel_count_is_refused():
    with pytest.raises(ValueError, match="input channel"):
        UNet(out_classes=2, width=4, in_channels=1)(torch.randn(1, 3, 32, 32))


def test_build_from_spec_is_the_network_of_a_model_spec_with_its_weights():
    trained = build_unet(ModelConfig(width=4), 3)
    spec = {"model": {"width": 4, "in_channels": 1, "projection_dim": 8, "from_a_newer_version": 1}, "num_classes": 2}
    net = build_from_spec(spec, trained.state_dict())
    assert isinstance(net, UNet) and not net.training and net.out_classes == 3 and net.encoder.width == 4
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), trained.state_dict().values()))
    assert build_from_spec({"model": ModelConfig(width=4), "num_classes": 2}).out_classes == 3  # a config, no weights
    with pytest.raises(ValueError, match="size mismatch") as err:
        build_from_spec({**spec, "num_classes": 3}, trained.state_dict())
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="no 'num_classes'"):
        build_from_spec({"model": {"width": 4}})
    with pytest.raises(ValueError, match="width"):
        build_from_spec({"model": {"width": 0}, "num_classes": 1})
