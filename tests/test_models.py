"""Models: registry, parameter counts of the paper configurations, shapes, training signal, AU leakage guard."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from mer.model.errors import ConfigError, DataError
from mer.model.models import (
    autocast_dtype,
    count_parameters,
    create_model,
    list_configs,
    list_models,
    load_checkpoint,
    model_inputs,
    model_targets,
    prepare_for_device,
    save_checkpoint,
    to_device_batch,
)
from mer.model.models.htnet import tile_regions
from mer.model.models.cva_fpf import UNUSED_AUTHOR_PARAMETERS as SWIN_UNUSED
from mer.model.models.mmnet import UNUSED_AUTHOR_PARAMETERS
from mer.model.models.mol import CCC, landmark_l1_loss

torch.set_num_threads(2)
NUM_AUS = 21
FRAMES = 8


def make_batch(keys: tuple[str, ...], b: int = 2, classes: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random batch following the batch-tensor conventions of docs/architecture.md."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.tensor([[9.0, 10.0], [19.0, 10.0], [14.0, 15.0], [10.0, 20.0], [18.0, 20.0]])
    landmarks = torch.rand(b, FRAMES, 68, 2, generator=g) * 40 + 44
    landmarks[..., 36:42, 0] -= 15  # eyes apart so the inter-ocular distance is realistic
    landmarks[..., 42:48, 0] += 15
    makers = {
        "flow28": lambda: torch.rand(b, 3, 28, 28, generator=g),
        "points5": lambda: pts.expand(b, 5, 2).clone(),
        "onset224": lambda: torch.rand(b, 3, 224, 224, generator=g),
        "apex224": lambda: torch.rand(b, 3, 224, 224, generator=g),
        "frames128": lambda: torch.rand(b, FRAMES, 128, 128, generator=g),
        "flows128": lambda: torch.randn(b, FRAMES - 1, 2, 128, 128, generator=g),
        "landmarks68": lambda: landmarks,
        "aus": lambda: (torch.rand(b, NUM_AUS, generator=g) > 0.7).float(),
        "label": lambda: torch.arange(b) % classes,
    }
    return {k: makers[k]() for k in keys}


def test_registry_lists_every_model_with_paper_and_small() -> None:
    assert {"htnet", "mmnet", "cva_fpf", "mol", "ststnet"} <= set(list_models())
    for name in list_models():
        assert {"paper", "small"} <= set(list_configs(name))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"name": "nope"}, "model.name"),
        ({"name": "htnet", "config": "huge"}, "model.config"),
        ({"name": "htnet", "dimm": 3}, "model.kwargs.dimm"),
        ({"name": "htnet", "regions": "diagonal"}, "model.kwargs.regions"),
        ({"name": "cva_fpf", "config": "small", "position_frames": ("flow28",)}, "model.kwargs.position_frames"),
        ({"name": "cva_fpf", "config": "small", "swin_depths": (1, 1), "swin_heads": (1, 2)},
         "model.kwargs.swin_depths"),
    ],
)
def test_bad_configuration_names_the_key(kwargs: dict[str, Any], key: str) -> None:
    name = kwargs.pop("name")
    config = kwargs.pop("config", "small")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        create_model(name, config, num_classes=3, **kwargs)


def _meta(name: str, num_classes: int, config: str = "paper", **kw: Any) -> torch.nn.Module:
    """Paper configurations on the meta device: exact parameter counts without allocating ~1 GB."""
    with torch.device("meta"):
        return create_model(name, config, num_classes=num_classes, **kw)


def test_paper_parameter_counts() -> None:
    assert count_parameters(_meta("htnet", 3)) == 139_582_982

    mmnet = _meta("mmnet", 5)
    main = count_parameters(mmnet.main) - count_parameters(mmnet.main.conv_act) + count_parameters(mmnet.classifier)
    assert main == 3_025_429
    assert count_parameters(mmnet.main.conv_act) == 5_220
    assert count_parameters(mmnet.pos_branch) + UNUSED_AUTHOR_PARAMETERS == 6_411_782
    # The LayerScale on the position branch (c_last values, position_scale) is ours, not the authors'.
    assert count_parameters(mmnet) - mmnet.pos_scale.numel() + UNUSED_AUTHOR_PARAMETERS == 9_442_431

    cva = _meta("cva_fpf", 5)
    assert count_parameters(cva.pos_branch) + SWIN_UNUSED == 22_089_632
    cva_main = count_parameters(cva) - count_parameters(cva.pos_branch) - cva.pos_scale.numel()
    assert cva_main == 54_180_000  # authors: "about 54.2M"; no a_w conv (never applied), AU head 512->21 included
    assert 40e6 < count_parameters(_meta("mol", 5)) < 48e6  # hand count of the authors' code: about 44.1M


SMALL_CASES = [
    ("htnet", {}),
    ("htnet", {"regions": "corrected", "input_format": "unit"}),
    ("htnet", {"regions": "none"}),
    ("ststnet", {}),
    ("mmnet", {}),
    ("mmnet", {"motion": "flow", "position": "none"}),
    ("cva_fpf", {}),
    ("cva_fpf", {"au_mode": "annotated"}),
    ("cva_fpf", {"au_mode": "none", "attention": "ca", "position": "pc"}),
    ("cva_fpf", {"motion": "flow", "position_frames": ("apex224",)}),
    ("cva_fpf", {"motion": "flow", "position": "none"}),
    ("mol", {}),
    ("mol", {"use_flow": False, "use_landmarks": False}),
]


@pytest.mark.parametrize(("name", "kw"), SMALL_CASES)
def test_small_forward_backward_shapes(name: str, kw: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = create_model(name, "small", num_classes=3, num_aus=NUM_AUS, **kw) if name == "cva_fpf" else create_model(
        name, "small", num_classes=3, **kw
    )
    assert model.inputs == model_inputs(name, "small", **kw)
    batch = make_batch(model.inputs + model.targets)
    out = model(batch)
    assert out["logits"].shape == (2, 3) and out["logits"].dtype == torch.float32
    if name == "mol":
        assert ("flow" in out) == kw.get("use_flow", True) and ("landmarks" in out) == kw.get("use_landmarks", True)
        if "flow" in out:
            assert out["flow"].shape == (2, FRAMES - 1, 2, 128, 128)
            assert out["landmarks"].shape == (2, FRAMES - 1, 68, 2)
    if name == "cva_fpf" and kw.get("au_mode", "predicted") == "predicted":
        assert out["au_logits"].shape == (2, NUM_AUS)
    loss, parts = model.loss(out, batch)
    loss.backward()
    assert torch.isfinite(loss) and parts["loss"] == pytest.approx(float(loss.detach()))
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", list_models())
def test_gradient_steps_reduce_loss(name: str) -> None:
    torch.manual_seed(0)
    kw = {"dropout": 0.0}
    model = create_model(name, "small", num_classes=3, **kw)
    batch = make_batch(model.inputs + model.targets, b=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        loss, _ = model.loss(model(batch), batch)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]


def test_ablation_switches_remove_exactly_their_parameters() -> None:
    full = create_model("cva_fpf", "small", num_classes=5)
    no_fpf = create_model("cva_fpf", "small", num_classes=5, position="none")
    no_cva = create_model("cva_fpf", "small", num_classes=5, attention="none")
    no_au = create_model("cva_fpf", "small", num_classes=5, au_mode="none")
    assert (count_parameters(full) - count_parameters(no_fpf)
            == count_parameters(full.pos_branch) + full.pos_scale.numel())
    assert no_fpf.pos_branch is None and "onset224" in no_fpf.inputs  # onset still needed for apex - onset
    cva_params = sum(count_parameters(a) for a in full.main.attentions)
    assert cva_params > 0 and count_parameters(full) - count_parameters(no_cva) == cva_params
    au_params = count_parameters(full.au_head) + 2 * NUM_AUS + NUM_AUS * full.classifier[3].out_features
    assert count_parameters(full) - count_parameters(no_au) == au_params
    assert not any(n.startswith("au_head") for n, _ in no_au.named_parameters())


def test_io_declarations_follow_configuration() -> None:
    assert model_inputs("cva_fpf", "flow") == ("flow28",)
    assert model_targets("cva_fpf", "paper") == ("label", "aus")
    assert model_inputs("cva_fpf", "paper_annotated") == ("onset224", "apex224", "aus")
    assert model_inputs("mmnet", "paper") == ("onset224", "apex224")
    assert model_targets("mol", "small") == ("label", "flows128", "landmarks68")
    assert model_targets("mol", "mer_only") == ("label",)
    assert model_inputs("htnet", "paper") == ("flow28", "points5")


class NoAUsBatch(dict):
    """A batch that fails the test if anything looks at the ground-truth AUs."""

    def _check(self, key: object) -> None:
        if key == "aus":
            raise AssertionError("ground-truth AUs were read")

    def __getitem__(self, key: str) -> torch.Tensor:
        self._check(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self._check(key)
        return super().__contains__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self._check(key)
        return super().get(key, default)


def test_predicted_au_mode_never_reads_ground_truth_at_inference() -> None:
    model = create_model("cva_fpf", "small", num_classes=3).eval()
    assert model.leaks_labels is False and "aus" not in model.inputs
    batch = make_batch(("onset224", "apex224", "aus", "label"))
    guarded = NoAUsBatch({k: v for k, v in batch.items()})  # aus present but untouchable
    with torch.no_grad():
        out = model(guarded)
    assert out["au_logits"].shape == (2, NUM_AUS)
    with torch.no_grad():
        other = make_batch(("onset224", "apex224")) | {"aus": 1 - batch["aus"]}
        assert torch.equal(model(other)["logits"], model({**other, "aus": batch["aus"]})["logits"])

    annotated = create_model("cva_fpf", "small_annotated", num_classes=3).eval()
    assert annotated.leaks_labels is True
    with pytest.raises(AssertionError, match="ground-truth AUs"):
        annotated(guarded)


def test_au_loss_ignores_samples_without_au_coding() -> None:
    """A sample whose dataset has no AU coding (aus_mask 0) adds nothing to the AU term: its all-zero `aus` is
    unknown, not "no AU". All coded = the plain BCE mean; none coded = 0, and backward still works."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = create_model("cva_fpf", "small", num_classes=3, num_aus=NUM_AUS)
    batch = make_batch(("onset224", "apex224", "aus", "label"), b=3)
    outputs = model(batch)
    plain = F.binary_cross_entropy_with_logits(outputs["au_logits"].float(), batch["aus"])
    _, parts = model.loss(outputs, batch)
    assert parts["au_bce"] == pytest.approx(plain.item(), rel=1e-6)  # no mask: every sample coded
    _, parts = model.loss(outputs, {**batch, "aus_mask": torch.ones(3)})
    assert parts["au_bce"] == pytest.approx(plain.item(), rel=1e-6)

    mask = torch.tensor([1.0, 0.0, 1.0])
    _, parts = model.loss(outputs, {**batch, "aus_mask": mask})
    coded = F.binary_cross_entropy_with_logits(outputs["au_logits"].float()[[0, 2]], batch["aus"][[0, 2]])
    assert parts["au_bce"] == pytest.approx(coded.item(), rel=1e-6)
    flipped = batch["aus"].clone()
    flipped[1] = 1 - flipped[1]  # the uncoded sample's targets do not matter
    _, again = model.loss(outputs, {**batch, "aus": flipped, "aus_mask": mask})
    assert again["au_bce"] == parts["au_bce"]

    total, parts = model.loss(outputs, {**batch, "aus_mask": torch.zeros(3)})
    ce, _ = model.classification_loss(outputs, batch)
    assert parts["au_bce"] == 0.0 and total.item() == pytest.approx(ce.item())
    total.backward()
    assert any(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["mmnet", "cva_fpf"])
def test_chained_attention_maps_start_positive(name: str) -> None:
    """The chained attention of the main branch starts as a product of (0, 1) maps at every stage (CVA projects the
    previous map across channels: a signed random projection made it a near-zero, sign-flipping map that shrank the
    last stages' features ~20x at initialisation)."""
    torch.manual_seed(0)
    model = create_model(name, "flow_small", num_classes=3).train()
    x = model.main.stem(model.main.conv_act(torch.rand(8, 3, 64, 64)))
    amap = None
    for unit, attention in zip(model.main.units, model.main.attentions, strict=True):
        x, amap = attention(unit(x), amap)
        assert float(amap.min()) > 0.0 and float(amap.max()) < 1.0


def test_flow_motion_input_is_centred_on_the_zero_motion_level() -> None:
    """flow_center=median subtracts each map's per-channel median (the zero-motion level of a min-max normalised map);
    "none" feeds the map as stored."""
    flow = torch.rand(2, 3, 28, 28) * 0.2 + torch.tensor([0.2, 0.6, 0.1]).view(1, 3, 1, 1)
    centred = create_model("mmnet", "flow_small", num_classes=3, img_size=32)
    raw = create_model("mmnet", "flow_small", num_classes=3, img_size=32, flow_center="none")
    medians = centred.motion_input({"flow28": flow}).flatten(2).median(dim=2).values
    assert medians.abs().max() < 0.02  # bilinear resizing to 32 px moves the median slightly
    assert torch.allclose(raw.motion_input({"flow28": flow}).mean((2, 3)), flow.mean((2, 3)), atol=1e-2)


@pytest.mark.parametrize(("name", "position"), [("mmnet", "pc"), ("cva_fpf", "fpf"), ("cva_fpf", "pc")])
def test_position_features_start_below_the_motion_features(name: str, position: str) -> None:
    """The position branch ends in a LayerNorm (unit scale) while the motion features leave chained (0, 1) attention
    maps at about a tenth of that; unscaled, the face's appearance drowned the motion and CVA+FPF could not fit 24
    clips. The LayerScale `position_scale` starts the position stream below the motion stream."""
    torch.manual_seed(0)
    model = create_model(name, "small", num_classes=3, position=position).train()
    batch = make_batch(model.inputs)
    with torch.no_grad():
        motion = model.main(model.motion_input(batch))
        frame = model.position_frames[0]
        position_part = model.pos_scale * model.pos_branch(model.face(batch, frame))
    assert float(position_part.std()) < float(motion.std())
    unscaled = create_model(name, "small", num_classes=3, position=position, position_scale=1.0)
    assert torch.all(unscaled.pos_scale == 1.0)  # the paper-literal sum stays available


def test_fpf_of_another_width_than_the_main_branch_is_projected_to_it() -> None:
    """A CPU-scale FPF whose embed dim is searched on its own: its last stage (4 x embed dim channels) is mapped to
    the main branch's width by a 1x1 convolution; the paper's widths match (512), so it has none."""
    for embed_dim in (8, 32):
        model = create_model("cva_fpf", "small", num_classes=3, swin_embed_dim=embed_dim)
        assert model.pos_branch.proj.in_channels == 4 * embed_dim and model.pos_branch.proj.out_channels == 64
        assert model(make_batch(model.inputs))["logits"].shape == (2, 3)
    assert isinstance(_meta("cva_fpf", 3).pos_branch.proj, torch.nn.Identity)


def test_fpf_without_face_input_is_a_clear_error() -> None:
    model = create_model("cva_fpf", "small", num_classes=3, motion="flow")
    with pytest.raises(DataError, match="onset224"):
        model(make_batch(("flow28",)))


def test_htnet_tiling_paper_and_corrected() -> None:
    grid = torch.arange(28 * 28, dtype=torch.float32).view(1, 1, 28, 28).expand(1, 3, 28, 28)
    pts = torch.tensor([[[9.0, 10.0], [19.0, 10.0], [14.0, 15.0], [10.0, 20.0], [30.0, 2.0]]])
    paper = tile_regions(grid, pts, "paper")[0, 0]
    assert torch.equal(paper[:14, :14], grid[0, 0, 2:16, 3:17])  # patch0: rows by x=9, cols by y=10
    assert torch.equal(paper[:14, 14:], grid[0, 0, 12:26, 3:17])  # patch1 (right eye) beside it
    assert torch.equal(paper[14:, :14], grid[0, 0, 3:17, 13:27])  # patch3 below
    assert torch.equal(paper[14:, 14:], grid[0, 0, 14:28, 0:14])  # patch4 clamped to x=21, y=7
    corrected = tile_regions(grid, pts, "corrected")[0, 0]
    assert torch.equal(corrected[:14, :14], grid[0, 0, 3:17, 2:16])
    assert torch.equal(corrected[:14, 14:], grid[0, 0, 3:17, 12:26])

    model = create_model("htnet", "small", num_classes=3)
    flow = torch.rand(1, 3, 28, 28)
    x = model.prepare_input({"flow28": flow, "points5": pts})
    assert torch.allclose(x, tile_regions(flow, pts, "paper").flip(1) * 255)  # BGR, 0-255


def test_ccc_matches_per_node_reference() -> None:
    torch.manual_seed(0)
    ccc = CCC(channels=6, size=3, k=2).eval()
    x = torch.randn(2, 6, 3, 3)
    out = ccc(x)
    f = x.flatten(2)
    expected = torch.empty_like(f)
    for b in range(2):
        for i in range(6):
            sims = torch.nn.functional.cosine_similarity(f[b, i : i + 1], f[b], dim=-1)
            sims[i] = -float("inf")
            nbrs = sims.topk(2).indices
            edges = [torch.relu(ccc.w1(f[b, i]) + ccc.w2(f[b, j] - f[b, i])) for j in nbrs]
            expected[b, i] = torch.stack(edges).amax(0)
    assert torch.allclose(out, ccc.norm(expected.view(2, 6, 3, 3)), atol=1e-5)


def test_mol_landmark_loss_is_l1_normalised_by_inter_ocular_distance() -> None:
    target = torch.zeros(1, 1, 68, 2)
    target[..., 42:48, 0] = 40.0  # eye centres 40 px apart
    assert float(landmark_l1_loss(target + torch.tensor([3.0, 1.0]), target)) == pytest.approx(4.0 / 40.0)


def test_determinism_with_fixed_seed() -> None:
    def run() -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(7)
        model = create_model("cva_fpf", "small", num_classes=3)
        batch = make_batch(model.inputs + model.targets)
        loss, _ = model.loss(model(batch), batch)
        loss.backward()
        return loss.detach(), model.fc1.weight.grad.clone()

    (l1, g1), (l2, g2) = run(), run()
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


@pytest.mark.parametrize("name", list_models())
def test_flip_tta_averages_the_probabilities_of_the_two_views(name: str, tmp_path: Any) -> None:
    """train.tta="flip": predictions are the mean class probabilities of the batch and its mirror image, through
    `tta_forward` and `predict_proba` alike; the model's own forward stays one view; the mode survives a
    checkpoint."""
    from mer.model.inference import predict_proba
    from mer.model.training.augment import mirror_batch, tta_forward

    torch.manual_seed(0)
    model = create_model(name, "small", num_classes=3).eval()
    batch = make_batch(model.inputs)
    with torch.no_grad():
        plain = model(batch)["logits"].softmax(-1)
        mirror = model(mirror_batch(batch))["logits"].softmax(-1)
        assert not torch.allclose(plain, mirror, atol=1e-4)  # the two views differ, so the checks below can fail
        torch.testing.assert_close(tta_forward(model, batch, "none")["logits"].softmax(-1), plain)
        model.set_tta("flip")
        averaged = tta_forward(model, batch, model.tta)["logits"].softmax(-1)
        torch.testing.assert_close(model(batch)["logits"].softmax(-1), plain)
    torch.testing.assert_close(averaged, (plain + mirror) / 2, atol=1e-5, rtol=0)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "m.pt"))
    assert loaded.tta == "flip"
    np.testing.assert_allclose(predict_proba(loaded, batch), averaged.numpy(), atol=1e-5)
    with pytest.raises(ConfigError, match="train.tta"):
        model.set_tta("five-crop")


def test_checkpoint_roundtrip_rebuilds_without_params(tmp_path: Any) -> None:
    model = create_model("htnet", "small", num_classes=4, regions="corrected", block_repeats=(1, 1, 1)).eval()
    path = save_checkpoint(model, tmp_path / "m.pt", {"fold": "casme2/sub01"})
    loaded = load_checkpoint(path)
    assert loaded.regions == "corrected" and loaded.num_classes == 4 and len(loaded.levels[2][0].layers) == 1
    assert loaded.checkpoint_meta == {"fold": "casme2/sub01"}
    batch = make_batch(model.inputs)
    with torch.no_grad():
        assert torch.equal(model(batch)["logits"], loaded(batch)["logits"])


def test_htnet_paper_input_matches_authors_pipeline_on_a_real_sample(composite_dir: Any) -> None:
    """The stored PNG read the authors' way (cv2 BGR, 0-255, x as row) equals what HTNet builds from our batch."""
    import csv

    import cv2
    import numpy as np

    with open(composite_dir / "landmarks5_28px.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    png = composite_dir / "datasets" / "STSNet_whole_norm_u_v_os" / f"{row['imagename'].rsplit('.', 1)[0]} .png"
    bgr = cv2.imread(str(png)).astype(np.float32)
    names = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
    pts = np.array([[float(row[f"{n}_x"]), float(row[f"{n}_y"])] for n in names])
    xy = np.clip(np.rint(pts).astype(int), 7, 21)
    patch = [bgr[x - 7 : x + 7, y - 7 : y + 7] for x, y in xy]
    authors = cv2.vconcat([cv2.hconcat([patch[0], patch[1]]), cv2.hconcat([patch[3], patch[4]])])

    rgb01 = torch.from_numpy(bgr[..., ::-1].copy() / 255.0).permute(2, 0, 1)[None].float()  # our flow28 convention
    model = create_model("htnet", "small", num_classes=3)
    ours = model.prepare_input({"flow28": rgb01, "points5": torch.from_numpy(pts)[None].float()})
    assert torch.allclose(ours[0].permute(1, 2, 0), torch.from_numpy(authors), atol=1e-3)


def test_mixed_precision_keeps_the_loss_in_float32() -> None:
    model = prepare_for_device(create_model("htnet", "small", num_classes=3, regions="none"), "cpu")
    batch = to_device_batch(make_batch(model.inputs + model.targets), model, "cpu")
    with torch.autocast("cpu", dtype=autocast_dtype("cpu")):
        out = model(batch)
        loss, _ = model.loss(out, batch)
    assert out["logits"].dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)


def test_htnet_attention_computes_scaled_dot_product_attention() -> None:
    """HTNet's attention (explicit products, vmap-friendly) gives the outputs of torch's scaled_dot_product_attention,
    the formulation it replaced, for every attention module of the paper-shaped small network (float tolerance)."""
    import torch.nn.functional as F

    from mer.model.models.htnet import _ConvAttention

    torch.manual_seed(0)
    model = create_model("htnet", "small", num_classes=3).eval()
    modules = [m for m in model.modules() if isinstance(m, _ConvAttention)]
    assert modules
    for m in modules:
        dim = m.to_qkv.in_channels
        x = torch.randn(5, dim, 4, 4)
        q, k, v = (t.reshape(5, m.heads, m.dim_head, 16).transpose(-1, -2) for t in m.to_qkv(x).chunk(3, dim=1))
        reference = m.to_out(F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(5, -1, 4, 4))
        torch.testing.assert_close(m(x), reference, rtol=1e-5, atol=1e-5)
