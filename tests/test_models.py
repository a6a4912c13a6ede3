import torch
import pytest

from boxseg.models.hourglass import Hourglass
from boxseg.models.largefov import LargeFOV
from boxseg.models.vgg import TORCHVISION_CONV_INDICES


def test_largefov_size_and_stride():
    m = LargeFOV(21)
    assert sum(p.numel() for p in m.parameters()) == 20_505_429  # METHOD.md: 20.5 M
    with torch.no_grad():
        assert m.eval()(torch.zeros(1, 3, 321, 321)).shape == (1, 21, 41, 41)


def test_largefov_flops_match_method():
    from torch.utils.flop_counter import FlopCounterMode

    m = LargeFOV(21).eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(torch.zeros(1, 3, 321, 321))
    assert fc.get_total_flops() / 1e9 == pytest.approx(101.9, abs=0.1)


def _torchvision_vgg16_state() -> dict:
    """A state dict with torchvision's vgg16 names and shapes (random values)."""
    g = torch.Generator().manual_seed(0)
    state, cin = {}, 3
    outs = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    for idx, cout in zip(TORCHVISION_CONV_INDICES, outs):
        state[f"features.{idx}.weight"] = torch.randn(cout, cin, 3, 3, generator=g)
        state[f"features.{idx}.bias"] = torch.randn(cout, generator=g)
        cin = cout
    state["classifier.0.weight"] = torch.randn(4096, 25088, generator=g)
    state["classifier.0.bias"] = torch.randn(4096, generator=g)
    state["classifier.3.weight"] = torch.randn(4096, 4096, generator=g)
    state["classifier.3.bias"] = torch.randn(4096, generator=g)
    state["classifier.6.weight"] = torch.randn(1000, 4096, generator=g)
    state["classifier.6.bias"] = torch.randn(1000, generator=g)
    return state


def test_vgg16_loading_from_torchvision_names(tmp_path):
    from boxseg.models.vgg import load_vgg16_state

    state = _torchvision_vgg16_state()
    torch.save(state, tmp_path / "vgg16.pth")
    m = LargeFOV(21)
    m.load_vgg16(load_vgg16_state(tmp_path / "vgg16.pth"))
    convs = m.trunk.convs()
    assert torch.equal(convs[0].weight, state["features.0.weight"])
    assert torch.equal(convs[12].bias, state["features.28.bias"])
    w6 = state["classifier.0.weight"].reshape(4096, 512, 7, 7)
    # fc6 filter 1 = torchvision filter 4, taps at rows/cols 0, 3, 6 of the 7x7
    assert torch.equal(m.fc6.weight[1, :, 2, 1], w6[4, :, 6, 3])
    assert torch.equal(m.fc7.weight[5, 7, 0, 0], state["classifier.3.weight"][20, 28])
    assert torch.equal(m.fc7.bias, state["classifier.3.bias"][::4])


def test_vgg16_loading_rejects_other_files(tmp_path):
    from boxseg.models.vgg import load_vgg16_state

    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="not a torchvision VGG16 state dict"):
        load_vgg16_state(tmp_path / "x.pth")
    with pytest.raises(ValueError, match="width=1.0"):
        LargeFOV(21, width=0.5).load_vgg16(_torchvision_vgg16_state())
    with pytest.raises(ValueError, match="13 convs"):
        LargeFOV(21, convs_per_block=(1, 1, 1, 1, 1)).load_vgg16(_torchvision_vgg16_state())


def test_largefov_shallow_preset_layout():
    """The tiny preset's trunk: one conv per block, same output stride 8, fc6 dilation as given."""
    m = LargeFOV(21, width=0.25, batch_norm=True, dropout=0.0, convs_per_block=(1, 1, 1, 1, 1), fc6_dilation=2)
    assert len(m.trunk.convs()) == 5 and m.fc6.dilation == (2, 2)
    assert [c.out_channels for c in m.trunk.convs()] == [16, 32, 64, 128, 128]
    with torch.no_grad():
        assert m.eval()(torch.zeros(1, 3, 97, 97)).shape == (1, 21, 13, 13)
    with pytest.raises(ValueError, match="convs_per_block"):
        LargeFOV(21, convs_per_block=(2, 2, 3, 3))


@pytest.mark.parametrize("channels", [4, 5])
def test_hourglass_stride_4(channels):
    m = Hourglass(channels, widths=(16, 16, 24, 24), blocks=1, bottom_blocks=2, stem_channels=8).eval()
    with torch.no_grad():
        assert m(torch.zeros(2, channels, 128, 128)).shape == (2, 2, 32, 32)
    with pytest.raises(ValueError, match="4 .* or 5"):
        Hourglass(3)


def test_default_hourglass_is_the_light_reference_variant():
    m = Hourglass(4)
    assert m.widths == (96, 96, 128, 128, 128, 192)
    with torch.no_grad():
        assert m.eval()(torch.zeros(1, 4, 512, 512)).shape == (1, 2, 128, 128)


def test_round2_expansion_preserves_round1_function():
    torch.manual_seed(0)
    m4 = Hourglass(4, widths=(16, 16, 24), blocks=1, bottom_blocks=1, stem_channels=8).eval()
    m5 = m4.expand_to_five_channels().eval()
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        a = m4(x)
        b = m5(torch.cat([x, torch.rand(2, 1, 64, 64)], 1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert m5.in_channels == 5


def test_a_few_steps_lower_the_loss():
    from boxseg.train.segnet1 import masked_cross_entropy

    torch.manual_seed(0)
    m = LargeFOV(5, width=0.125, batch_norm=True, dropout=0.0)
    blocks = torch.randint(0, 5, (4, 1, 4, 4)).float()  # learnable: each 16-px block's class sets its colour
    y = torch.nn.functional.interpolate(blocks, size=(65, 65), mode="nearest")[:, 0].long()
    x = torch.cat([y[:, None].float() / 2 - 1, -y[:, None].float() / 4, torch.zeros(4, 1, 65, 65)], 1)
    y[:, :10] = 255
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    losses = []
    for _ in range(15):
        logits = torch.nn.functional.interpolate(m(x), size=(65, 65), mode="bilinear", align_corners=False)
        loss = masked_cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_any_garbage_as_a_checkpoint_is_bad_input_never_a_crash(tmp_path):
    """Random bytes read as a legacy pickle failed with IndexError, KeyError or
    UnicodeDecodeError in ~8% of 4 KiB files (a flaky fault-suite case): every one is now a
    DataError naming the file."""
    import numpy as np

    from boxseg.errors import DataError
    from boxseg.models.checkpoint import load_state_file

    rng = np.random.default_rng(0)
    path = tmp_path / "garbage.pt"
    problems = set()
    for k in range(400):
        blob = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
        if k % 4 == 0:  # pickle opcodes at the start, where the unpickler goes furthest
            blob = bytes([rng.choice([0x80, 0x58, 0x55, 0x63, 0x68, 0x6A, 0x4B])]) + blob[1:]
        path.write_bytes(blob)
        with pytest.raises(DataError) as e:
            load_state_file(path)
        assert e.value.path == str(path) and e.value.problem.startswith(("cannot read checkpoint", "refused", "checkpoint holds"))
        problems.add(e.value.problem.split(":")[0])
    assert "cannot read checkpoint" in problems
