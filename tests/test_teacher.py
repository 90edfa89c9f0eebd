"""The whitened (airbench94-style) teacher and the distillation settings, on toys: whitening,
lookahead, test-time averaging, the augmentation, the KL loss, and that the teacher sees the
student's own augmented batch."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from toys import make_image_folder, tiny_vit
from train import main as train_main
from vit_core import ViTClassifier
from vit_core.config import TrainConfig, TrainError
from vit_core.teacher import (ConvTeacher, Lookahead, WhitenedTeacher, flip_translate, load_teacher, triangle,
                              tta_logits, whitening_init_)
from vit_core.training import distillation_loss, train, train_step


def correlated_images(n: int = 64, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth, colour-correlated images: neighbouring pixels and channels move together."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, size // 4, size // 4, generator=g)
    mix = torch.tensor([[1.0, 0.8, 0.6], [0.0, 0.5, 0.4], [0.0, 0.0, 0.3]])
    smooth = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    return torch.einsum("dc,nchw->ndhw", mix, smooth) + 0.05 * torch.randn(n, 3, size, size, generator=g)


def second_moment(conv_out: torch.Tensor) -> torch.Tensor:
    flat = conv_out.permute(0, 2, 3, 1).reshape(-1, conv_out.shape[1]).double()
    return flat.T @ flat / len(flat)


def test_whitening_init_decorrelates_the_patches_and_keeps_both_signs():
    images = correlated_images()
    conv = torch.nn.Conv2d(3, 24, 2, bias=True)
    raw = second_moment(F.unfold(images, 2).transpose(1, 2).reshape(-1, 12, 1, 1))
    off_diagonal = (raw - torch.diag(raw.diagonal())).abs().max() / raw.diagonal().max()
    assert off_diagonal > 0.5  # the patches start strongly correlated
    whitening_init_(conv, images, eps=1e-7)
    with torch.no_grad():
        out = conv(images)
    assert torch.allclose(second_moment(out[:, :12]), torch.eye(12, dtype=torch.float64), atol=2e-3)
    assert torch.equal(out[:, 12:], -out[:, :12]) and torch.all(conv.bias == 0)
    # With eps the strongest direction (channel 0) stays near 1; the weakest is damped by λ / (λ + eps).
    whitening_init_(conv, images, eps=1.0)
    with torch.no_grad():
        damped = second_moment(conv(images)[:, :12]).diagonal()
    eigenvalues = torch.linalg.eigvalsh(raw).flip(0)
    assert torch.allclose(damped, eigenvalues / (eigenvalues + 1.0), atol=1e-4)


def test_whitening_init_refuses_a_conv_of_the_wrong_width():
    conv = torch.nn.Conv2d(3, 12, 2)
    before = conv.weight.clone()
    with pytest.raises(ValueError, match="needs 3 input and 24 output channels"):
        whitening_init_(conv, correlated_images(n=4))
    assert torch.equal(conv.weight, before)


def test_lookahead_moves_weights_and_average_together_by_the_decay():
    model = torch.nn.Sequential(torch.nn.Linear(2, 1, bias=False), torch.nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
    lookahead = Lookahead(model)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, -2.0]]))
        model[1].running_mean.fill_(4.0)
    lookahead.update(model, decay=0.75)
    expected = 0.75 * torch.tensor([[1.0, 2.0]]) + 0.25 * torch.tensor([[3.0, -2.0]])  # [[1.5, 1.0]]
    assert torch.allclose(model[0].weight, expected) and torch.allclose(lookahead.average["0.weight"], expected)
    assert model[1].running_mean.item() == pytest.approx(0.75 * 0 + 0.25 * 4.0)  # statistics averaged too
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0, 0.0]]))
    lookahead.update(model, decay=1.0)  # decay 1: back to the average, which stays
    assert torch.allclose(model[0].weight, expected)
    assert model[1].num_batches_tracked.dtype == torch.long  # integer buffers are left alone


class PixelProbe(torch.nn.Module):
    """'Logits' that read three fixed pixels of channel 0, so every view can be worked out by hand."""

    def forward(self, x):
        return torch.stack([x[:, 0, 5, 7], x[:, 0, 0, 0], x[:, 0, 2, 30]], dim=1)


def test_test_time_averaging_is_the_mean_over_mirror_and_shifted_views():
    probe = PixelProbe()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tta_logits(probe, x, 0, bf16=False), probe(x))
    mirror = 0.5 * (probe(x) + probe(x.flip(-1)))
    assert torch.allclose(tta_logits(probe, x, 1, bf16=False), mirror)
    img = x[:, 0]
    # Pixel (5, 7): the image and its mirror (column 31 - 7 = 24); shifted up-left the view shows
    # pixel (4, 6) and mirrored (4, 23); shifted down-right (6, 8) and (6, 25).
    def view(r, c, rm, cm):
        return 0.5 * (img[:, r, c] + img[:, rm, cm])

    expected = 0.5 * view(5, 7, 5, 24) + 0.25 * (view(4, 6, 4, 23) + view(6, 8, 6, 25))
    # Pixel (0, 0): up-left it is the reflection of row/column -1, i.e. (1, 1); mirrored (1, 30).
    expected_corner = 0.5 * view(0, 0, 0, 31) + 0.25 * (view(1, 1, 1, 30) + view(1, 1, 1, 30))
    level2 = tta_logits(probe, x, 2, bf16=False)
    assert torch.allclose(level2[:, 0], expected) and torch.allclose(level2[:, 1], expected_corner)


def test_flip_translate_mirrors_where_asked_and_shifts_by_at_most_pad_with_reflection():
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    flip = torch.tensor([True, False, True, False, True, False])
    assert torch.equal(flip_translate(x, flip, 0), torch.where(flip[:, None, None, None], x.flip(-1), x))
    out = flip_translate(x, flip, 2, torch.Generator().manual_seed(1))
    padded = F.pad(torch.where(flip[:, None, None, None], x.flip(-1), x), (2, 2, 2, 2), mode="reflect")
    shifts = []
    for b in range(len(x)):
        found = [(t, l) for t in range(5) for l in range(5) if torch.equal(out[b], padded[b, :, t:t + 8, l:l + 8])]
        assert found, f"image {b} is not a shifted view of its input"
        shifts.append(found[0])
    assert len(set(shifts)) > 1  # shifts are drawn per image


def test_triangular_schedule_rises_to_its_peak_then_falls_to_its_end():
    assert triangle(0.0) == pytest.approx(0.2)
    assert triangle(0.23) == pytest.approx(1.0)
    assert triangle(0.115) == pytest.approx(0.6)
    assert triangle(1.0) == pytest.approx(0.07)
    assert triangle(0.23 + 0.77 / 2) == pytest.approx((1.0 + 0.07) / 2)


def test_soft_distillation_is_kl_at_a_temperature_times_its_square():
    student = torch.tensor([[2.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0]])
    # At temperature T the two distributions are softmax([2/T, 0]) and softmax([0, 2/T]); their KL
    # divergence works out to (2/T) tanh(1/T) by hand: T = 1 gives 2 tanh(1), T = 2 gives tanh(1/2).
    assert distillation_loss(student, teacher, "soft", 0.0, 1.0).item() == pytest.approx(2 * math.tanh(1.0), rel=1e-5)
    assert distillation_loss(student, teacher, "soft", 0.0, 2.0).item() == pytest.approx(4 * math.tanh(0.5), rel=1e-5)
    # Over a batch it is the mean over images.
    both = distillation_loss(torch.cat([student, teacher]), torch.cat([teacher, teacher]), "soft", 0.0, 2.0)
    assert both.item() == pytest.approx(4 * math.tanh(0.5) / 2, rel=1e-5)


def test_a_train_step_weighs_label_cross_entropy_and_soft_targets():
    model = tiny_vit(n_classes=2, class_names=["a", "b"], image_size=16)
    teacher_out = torch.tensor([[1.0, -1.0], [0.5, 2.0], [0.0, 0.0], [-3.0, 1.0]])

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return teacher_out

    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 1, 0])
    cfg = TrainConfig(data="d", out="o", distill="soft", distill_temperature=3.0, distill_weight=0.25,
                      label_smoothing=0.0, clip_grad=0.0, amp="off")
    with torch.no_grad():
        logits = model(images)
    p_teacher = (teacher_out / 3).softmax(-1)
    kl = (p_teacher * (p_teacher.log() - (logits / 3).log_softmax(-1))).sum(-1).mean() * 9
    expected = 0.75 * F.cross_entropy(logits, labels) + 0.25 * kl
    _, loss = train_step(model.train(), torch.optim.SGD(model.parameters(), lr=0.0), images, labels, cfg,
                         torch.device("cpu"), teacher=Fixed())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_with_teacher_tta_the_soft_targets_average_the_teachers_logits_over_the_mirror_images():
    model = tiny_vit(n_classes=2, class_names=["a", "b"], image_size=16)

    class LeftHeavy(torch.nn.Module):  # logits that change under a mirror: left half minus right half
        def forward(self, x):
            left, right = x[..., :8].mean((1, 2, 3)), x[..., 8:].mean((1, 2, 3))
            return 20 * torch.stack([left - right, 2 * (right - left)], -1)

    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        logits = model(images)
    teacher = LeftHeavy()
    plain, mirrored = teacher(images), teacher(images.flip(-1))
    assert not torch.allclose(plain, mirrored)
    for level, teacher_out in ((0, plain), (1, (plain + mirrored) / 2)):
        cfg = TrainConfig(data="d", out="o", distill="soft", distill_weight=1.0, teacher_tta=level,
                          label_smoothing=0.0, clip_grad=0.0, amp="off")
        _, loss = train_step(model.train(), torch.optim.SGD(model.parameters(), lr=0.0), images,
                             torch.tensor([0, 1, 1, 0]), cfg, torch.device("cpu"), teacher=teacher)
        assert loss.item() == pytest.approx(distillation_loss(logits, teacher_out, "soft", 0.0).item(), rel=1e-5)


@pytest.fixture
def three_colours(tmp_path):
    return make_image_folder(tmp_path / "data", classes=("blue", "red", "green"), per_class=40)


def test_whitened_teacher_trains_alone_then_teaches_on_the_students_own_augmented_batches(
        three_colours, tmp_path, monkeypatch):
    import vit_core.training as training

    out = tmp_path / "teach"
    code = train_main(["--data", str(three_colours), "--out", str(out), "--teacher-only", "--teacher-kind", "whitened",
                       "--teacher-epochs", "8", "--val-size", "24", "--num-threads", "1"])
    assert code == 0 and not (out / "model.safetensors").exists()  # no ViT was trained
    info = json.loads((out / "teacher" / "teacher_info.json").read_text())
    assert info["kind"] == "whitened" and info["epochs_run"] == 8 and info["val_images"] == 24
    assert info["val_acc"] >= 0.9  # the colours are easy: a teacher that learnt nothing gets a third
    teacher = load_teacher(out / "teacher")
    assert isinstance(teacher, WhitenedTeacher) and teacher.class_names == ["blue", "green", "red"]

    seen = {"student": [], "teacher": [], "levels": []}
    real_forward, real_tta_logits = ViTClassifier.forward, training.tta_logits

    def student_forward(self, x, *args, **kwargs):
        if self.training:
            seen["student"].append(x.detach().clone())
        return real_forward(self, x, *args, **kwargs)

    def spied_tta_logits(net, images, level, bf16=True):
        seen["teacher"].append(images.detach().clone())
        seen["levels"].append(level)
        return real_tta_logits(net, images, level, bf16)

    monkeypatch.setattr(ViTClassifier, "forward", student_forward)
    monkeypatch.setattr(training, "tta_logits", spied_tta_logits)
    student = tmp_path / "student"
    train(TrainConfig(data=str(three_colours), out=str(student), preset="tiny", epochs=1, batch_size=16,
                      val_size=24, num_threads=1, teacher=str(out / "teacher"), distill="soft",
                      distill_temperature=2.0, cutmix=1.0, mixup=1.0, patch_drop=0.5, augment="crop",
                      teacher_tta=1))
    assert len(seen["teacher"]) == len(seen["student"]) == 96 // 16 and set(seen["levels"]) == {1}
    for student_batch, teacher_batch in zip(seen["student"], seen["teacher"]):
        assert torch.equal(student_batch, teacher_batch)
    card = (student / "README.md").read_text()
    assert "soft targets at temperature 2 on the same augmented images, its logits averaged with the mirror " \
        "images'" in card and "Teacher: the `WhitenedTeacher` CNN" in card
    assert "CutMix (p 1.0) + mixup (Beta(1, 1) shares, each batch mixed by one of the two at even odds)" in card


def test_a_time_budget_stops_the_whitened_teacher_and_the_card_says_so(three_colours, tmp_path):
    out = tmp_path / "teach"
    train(TrainConfig(data=str(three_colours), out=str(out), teacher_only=True, teacher_kind="whitened",
                      teacher_epochs=50, teacher_time_budget_min=1e-9, val_size=24, num_threads=1,
                      teacher_widths=[8, 16, 12]))
    teacher = load_teacher(out / "teacher")
    assert [g[0].out_channels for g in teacher.groups] == [8, 16, 12] and teacher.head.in_features == 12
    history = json.loads((out / "teacher" / "history.json").read_text())
    info = json.loads((out / "teacher" / "teacher_info.json").read_text())
    assert len(history) == 1 and history[0]["steps"] == 0 and info["epochs_run"] == 1
    from vit_core.card import _teacher_lines

    line = _teacher_lines({"teacher": info, "config": {"teacher": str(out / "teacher")}})[0]
    assert "for 1 of 50 epochs (its time budget ran out)" in line


def test_the_shipped_cnn_teacher_still_loads_as_its_own_kind():
    from toys import ROOT

    assert isinstance(load_teacher(ROOT / "checkpoints" / "cnn-teacher"), ConvTeacher)


@pytest.mark.parametrize("overrides, message", [
    (dict(distill_temperature=2.0), "--distill-temperature applies to --distill soft only"),
    (dict(distill="soft", distill_temperature=0.0), "--distill-temperature must be in"),
    (dict(teacher_only=True, teacher="none"), "--teacher-only needs --teacher auto"),
    (dict(teacher_time_budget_min=10.0), "--teacher-time-budget applies to --teacher-kind whitened only"),
    (dict(teacher_kind="resnet"), "--teacher-kind must be one of"),
    (dict(teacher_widths=[64, 0, 256]), "--teacher-widths takes three positive channel counts"),
    (dict(teacher_tta=3), "--teacher-tta must be one of"),
    (dict(teacher="none", teacher_tta=1), "--teacher-tta needs a teacher"),
])
def test_bad_distillation_settings_are_clear_errors(tmp_path, overrides, message):
    cfg = TrainConfig(data=str(tmp_path / "nowhere"), out=str(tmp_path / "out"), **overrides)
    with pytest.raises(TrainError, match=message):
        train(cfg)
    assert not (tmp_path / "out").exists()


def test_a_teacher_folder_naming_an_unknown_kind_is_a_clear_error(tmp_path):
    WhitenedTeacher().save_pretrained(tmp_path / "t")
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    (tmp_path / "t" / "config.json").write_text(json.dumps({**config, "kind": "resnet"}))
    with pytest.raises(ValueError, match="names teacher kind 'resnet'"):
        load_teacher(tmp_path / "t")


def test_teacher_weights_under_a_config_of_the_other_kind_are_refused(tmp_path):
    from vit_core.model import CheckpointMismatchError

    WhitenedTeacher().save_pretrained(tmp_path / "t")
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    config.pop("kind"), config.pop("whiten_kernel")  # now it reads as a ConvTeacher folder
    (tmp_path / "t" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match="is not a ConvTeacher"):
        load_teacher(tmp_path / "t")


def test_auto_copies_the_shipped_conv_teacher_only_when_a_conv_teacher_is_asked_for(three_colours, tmp_path,
                                                                                   monkeypatch, capsys):
    import vit_core.training as training_module

    def teacher_only(out, **settings):
        train(TrainConfig(data=str(three_colours), out=str(out), teacher_only=True, teacher_epochs=1, val_size=24,
                          num_threads=1, teacher_widths=[8, 16, 12], **settings))
        return json.loads((out / "teacher" / "teacher_info.json").read_text()), capsys.readouterr().out

    shipped, _ = teacher_only(tmp_path / "shipped")  # a conv teacher of this very split stands in for the shipped one
    monkeypatch.setattr(training_module, "SHIPPED_TEACHER", tmp_path / "shipped" / "teacher")
    info, said = teacher_only(tmp_path / "conv")
    assert info.get("reused_from") and "teacher: the shipped one" in said
    info, said = teacher_only(tmp_path / "whitened", teacher_kind="whitened", teacher_time_budget_min=1e-9)
    assert info["kind"] == "whitened" and not info.get("reused_from")
    assert "the shipped one does not fit: it is a conv teacher and --teacher-kind asks for whitened" in said
    assert isinstance(load_teacher(tmp_path / "whitened" / "teacher"), WhitenedTeacher)
