"""vit_core.evaluate (batched, mirror-averaged prediction and the test metrics) and vit_core.devices."""

from __future__ import annotations

import pytest
import torch

from toys import tiny_vit
from vit_core import devices
from vit_core.devices import DeviceError, pick_device, uses_bf16
from vit_core.evaluate import evaluate, predict_probs
from vit_core.preprocessing import normalize

CPU = torch.device("cpu")


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_predict_probs_averages_each_image_with_its_mirror(images):
    model = tiny_vit(sharpen=True)
    x = normalize(images, model.mean, model.std)
    with torch.no_grad():
        plain = model(x).softmax(-1)
        mirrored = model(x.flip(-1)).softmax(-1)
    torch.testing.assert_close(predict_probs(model, images, CPU, mirror=False), plain)
    torch.testing.assert_close(predict_probs(model, images, CPU), (plain + mirrored) / 2)
    torch.testing.assert_close(predict_probs(model, images, CPU, batch_size=3), (plain + mirrored) / 2)
    with pytest.raises(ValueError, match="at least one image"):
        predict_probs(model, images[:0], CPU)


def test_predict_probs_leaves_the_model_in_its_mode(images):
    model = tiny_vit().train()
    predict_probs(model, images, CPU)
    assert model.training


def test_evaluate_counts_agree_with_the_predictions(images):
    model = tiny_vit(sharpen=True)
    labels = torch.tensor([0, 1, 2, 3, 3, 3, 9])
    predicted = predict_probs(model, images, CPU).argmax(-1)
    result = evaluate(model, images, labels, CPU)
    confusion = torch.tensor(result["confusion"])
    assert confusion.sum() == 7 and result["n_images"] == 7 and result["mirror"] is True
    assert result["accuracy"] == pytest.approx((predicted == labels).float().mean().item())
    assert confusion.trace().item() == (predicted == labels).sum().item()
    for row, (true, guess) in enumerate(zip(labels.tolist(), predicted.tolist())):
        assert confusion[true, guess] >= 1, row
    cat = (predicted[3:6] == 3).float().mean().item()
    assert result["per_class"]["cat"] == pytest.approx(cat)
    assert result["per_class"]["bird"] == (1.0 if predicted[2] == 2 else 0.0)


def test_pick_device_names_and_one_line_errors(monkeypatch):
    assert pick_device("cpu") == CPU
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, message in [("gpu", "unknown --device 'gpu'"), ("meta", "unknown --device"),
                          ("cuda", "no CUDA GPU is available"), ("cuda:1", "no CUDA GPU is available")]:
        with pytest.raises(DeviceError, match=message) as info:
            pick_device(name)
        assert "\n" not in str(info.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match="has 1 CUDA GPU"):
        pick_device("cuda:1")
    assert pick_device("cuda:0") == torch.device("cuda", 0)
    assert issubclass(DeviceError, ValueError)


def test_bf16_choice(monkeypatch):
    cuda = torch.device("cuda")
    assert uses_bf16(CPU, "bf16") and not uses_bf16(cuda, "off") and uses_bf16(cuda, "auto")
    for units in (True, False):
        monkeypatch.setattr(devices, "cpu_has_bf16_units", lambda: units)
        assert uses_bf16(CPU, "auto") is units
    assert not uses_bf16(torch.device("mps"), "auto")
