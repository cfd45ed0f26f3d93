"""train.eval: DreamBench DINO / CLIP-I / CLIP-T, FID and the generation paths, on tiny random models
built from configs (nothing downloaded)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kosmosg_core.errors import OutputPathError
from support.argv import with_flags
from train.eval import coco, dreambench, fid
from train.eval.__main__ import SUBCOMMANDS
from train.eval.__main__ import main as eval_main
from train.eval.features import DinoFeatures, InceptionFeatures
from train.eval.metrics import all_pairs_cosine, frechet_distance, gaussian_statistics, paired_cosine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


def _noise(seed, size=(40, 48)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def _smooth(seed, size=(40, 48)):
    """A low-frequency image: very different statistics from uniform noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[0], 0:size[1]]
    base = 127 + 100 * np.sin(x / (5 + rng.uniform(0, 5)) + rng.uniform(0, 6))[..., None] * np.ones(3)
    return Image.fromarray(np.clip(base + 10 * np.cos(y / 7.0)[..., None], 0, 255).astype(np.uint8))


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny ViT (DINO), Dinov2, CLIP (+ processor, word tokenizer) and an image model with a processor."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, Dinov2Config, Dinov2Model, ViTConfig,
                              ViTImageProcessor, ViTModel)

    from support.tiny_hf_models import _quiet, word_tokenizer

    _quiet()
    root = tmp_path_factory.mktemp("eval_models")
    torch.manual_seed(0)
    vit = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=32,
               patch_size=8)
    ViTModel(ViTConfig(**vit), add_pooling_layer=False).save_pretrained(root / "dino")
    Dinov2Model(Dinov2Config(**vit)).save_pretrained(root / "dinov2")
    tokenizer = word_tokenizer()
    clip = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                                       pad_token_id=0, bos_token_id=1, eos_token_id=1),
                      vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(clip).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    ViTModel(ViTConfig(**vit)).save_pretrained(root / "image-model")  # pooled output -> FID features
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "image-model")
    return {name: str(root / name) for name in ("dino", "dinov2", "clip", "image-model")}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """DreamBench-layout folder: built-in subject `dog` and custom `widget` (class from prompts.json)."""
    root = tmp_path_factory.mktemp("dreambench")
    for s, subject in enumerate(["dog", "widget"]):
        (root / subject).mkdir()
        for i in range(2):
            _noise(10 * s + i).save(root / subject / f"{i:02d}.jpg", quality=95)
    (root / "prompts.json").write_text(json.dumps({"subjects": {"widget": {"class": "toy", "live": False}}}))
    return root


def _copy_references_as_generated(bench, out):
    """'Generated' images that are exactly the reference they were conditioned on, official names."""
    out.mkdir()
    for subject, prompt in (("dog", "a dog wearing a red hat"), ("widget", "a red toy")):
        for ref in sorted((bench / subject).iterdir()):
            Image.open(ref).convert("RGB").save(out / f"{subject}+{ref.stem}+0+{prompt}.png")


def _score(bench, generated, models, *extra):
    return dreambench.main(["--data", str(bench), "--generated", str(generated), "--dino-model", models["dino"],
                            "--clip-model", models["clip"], "--dino-image-size", "32", "--device", "cpu", *extra])


# ---- the numbers ---------------------------------------------------------------------------------
def test_frechet_distance_matches_closed_form_for_known_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    a, b = rng.uniform(0.5, 3, 4), rng.uniform(0.5, 3, 4)
    # diagonal (and, rotated, commuting) covariances: FD = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    rotated = frechet_distance(mu1, rotation @ np.diag(a) @ rotation.T, mu2, rotation @ np.diag(b) @ rotation.T)
    assert rotated == pytest.approx(expected, rel=1e-7)
    # general (non-commuting) covariances: the textbook formula with scipy's sqrtm
    from scipy import linalg

    x1, x2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2, m1, m2 = x1 @ x1.T + 0.1 * np.eye(6), x2 @ x2.T, rng.normal(size=6), rng.normal(size=6)
    textbook = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(textbook, rel=1e-8)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(4.0 + 1.0)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-9)
    # from samples: N(0, I) vs N(m, 4 I) in 3-D -> |m|^2 + 3 * (2 - 1)^2
    m = np.array([1.0, -2.0, 0.5])
    x, y = rng.normal(size=(40000, 3)), m + 2 * rng.normal(size=(40000, 3))
    from_samples = frechet_distance(*gaussian_statistics(x), *gaussian_statistics(y))
    assert from_samples == pytest.approx(np.sum(m ** 2) + 3.0, rel=0.03)
    # singular covariances (fewer samples than dimensions) still give a finite, non-negative value
    few = rng.normal(size=(3, 8))
    assert 0 <= frechet_distance(*gaussian_statistics(few), *gaussian_statistics(few + 1)) < np.inf
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_statistics(np.zeros((1, 5)))
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_cosines():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])
    assert torch.allclose(paired_cosine(a, b), torch.tensor([1.0, 0.0, -1.0]), atol=1e-6)
    table = all_pairs_cosine(a, b)
    assert table.shape == (3, 3) and torch.allclose(table[2], torch.tensor([2 ** -0.5, 2 ** -0.5, -1.0]), atol=1e-6)


def test_gaussian_statistics_use_the_unbiased_covariance():
    """FID statistics of [N, D] features: the mean and the N - 1 (unbiased) covariance, by hand on 3 points."""
    mean, covariance = gaussian_statistics(np.array([[0.0, 0.0], [2.0, 0.0], [4.0, 6.0]]))
    assert np.allclose(mean, [2.0, 2.0])
    # deviations x: -2, 0, 2; y: -2, -2, 4 -> sums of products 8, 24, 12 over N - 1 = 2
    assert np.allclose(covariance, [[4.0, 6.0], [6.0, 12.0]])


def test_resize_center_crop_keeps_the_aspect_and_takes_the_centre():
    """Shorter side -> resize (aspect kept), then the central square: a wide red | green | blue image
    gives only its green middle."""
    from train.eval.images import resize_center_crop

    pixels = np.zeros((40, 80, 3), dtype=np.uint8)  # [H, W, 3]
    pixels[:, :20], pixels[:, 20:60], pixels[:, 60:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    out = resize_center_crop(Image.fromarray(pixels), 20, 20)
    assert out.size == (20, 20)
    mean = np.asarray(out, dtype=np.float64).reshape(-1, 3).mean(0)
    assert mean[1] > 220 and mean[0] < 20 and mean[2] < 20


def test_fid_max_images_takes_the_first_n_by_name(tmp_path):
    """--max-images N uses exactly the first N images per side, sorted by name."""
    for i in range(4):
        _noise(i, (8, 8)).save(tmp_path / f"{i}.png")
    paths = fid._folder_paths(str(tmp_path), "--real", fid.FidConfig(max_images=2))
    assert [p.name for p in paths] == ["0.png", "1.png"]
    assert len(fid._folder_paths(str(tmp_path), "--real", fid.FidConfig())) == 4


def test_kosmosg_prompt_templates_follow_the_official_form():
    assert dreambench.kosmosg_template("a {} in the jungle") == "{} in the jungle"
    assert dreambench.kosmosg_template("a red {}") == "{}, red"
    assert dreambench.kosmosg_template("a cube shaped {}") == "{}, cube shaped"
    assert len(dreambench.OBJECT_PROMPTS) == len(dreambench.LIVE_PROMPTS) == 25
    assert len(dreambench.SUBJECT_CLASSES) == 30 and dreambench.LIVE_SUBJECTS <= set(dreambench.SUBJECT_CLASSES)
    assert all(p.count("{}") == 1 for p in dreambench.OBJECT_PROMPTS + dreambench.LIVE_PROMPTS)


# ---- feature extractors --------------------------------------------------------------------------
def test_dino_features_for_vit_and_dinov2(models):
    images = [_noise(1), _noise(1), _noise(2)]
    for name in ("dino", "dinov2"):
        features = DinoFeatures(models[name], CPU, image_size=32, batch_size=2)(images)
        assert features.shape == (3, 32) and torch.isfinite(features).all()
        assert torch.allclose(features[0], features[1])  # same image, same feature, across batches
        assert not torch.allclose(features[0], features[2])
    with pytest.raises(ValueError, match="--dino-model"):
        DinoFeatures(models["clip"], CPU)  # a CLIP folder is not a DINO model
    with pytest.raises(ValueError, match="--dino-model is required"):
        DinoFeatures("", CPU)


def test_dino_preprocessing_and_cls_feature(models):
    """DINO input as the official eval: resize to S * 256 / 224, centre crop S (a thin frame is cut off),
    ImageNet mean / std (an image of the mean colour is ~0); the feature is the CLS token [N, D] of the
    last hidden state."""
    from transformers import AutoModel

    from train.eval.features import IMAGENET_MEAN

    dino = DinoFeatures(models["dino"], CPU, image_size=32)
    mean_colour = tuple(round(255 * m) for m in IMAGENET_MEAN)
    assert dino.preprocess([Image.new("RGB", (40, 48), mean_colour)]).abs().max() < 0.02
    framed = np.zeros((74, 74, 3), dtype=np.uint8)
    framed[:2], framed[-2:], framed[:, :2], framed[:, -2:] = 255, 255, 255, 255  # 2-px white frame
    pixels = dino.preprocess([Image.fromarray(framed)])  # [1, 3, 32, 32]
    assert pixels.shape == (1, 3, 32, 32)
    std = torch.tensor((0.229, 0.224, 0.225))[:, None, None]
    unnormalised = pixels[0] * std + torch.tensor(IMAGENET_MEAN)[:, None, None]  # back to [0, 1]
    assert unnormalised.max() < 0.15  # the frame is outside the centre crop

    images = [_noise(1), _smooth(2)]
    model = AutoModel.from_pretrained(models["dino"]).eval()
    with torch.no_grad():
        expected = model(pixel_values=dino.preprocess(images)).last_hidden_state[:, 0]
    assert torch.allclose(dino(images), expected, atol=1e-5)


# ---- dreambench scoring ----------------------------------------------------------------------------
def test_identical_images_score_one_and_clip_t_uses_the_class_noun(bench, models, tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    _copy_references_as_generated(bench, tmp_path / "same")
    result = _score(bench, tmp_path / "same", models)
    metrics = result["metrics"]
    assert result["num_images"] == 4 and result["num_subjects"] == 2
    assert metrics["dino"] == pytest.approx(1.0, abs=1e-5)  # each image vs the reference it copies
    assert metrics["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["dino_all_pairs"] < 1.0 - 1e-4  # the two references of a subject differ
    assert metrics["clip_i_all_pairs"] < 1.0 - 1e-4
    assert set(result["per_subject"]) == {"dog", "widget"}
    assert json.loads((tmp_path / "same" / "dreambench_metrics.json").read_text())["metrics"] == metrics
    # CLIP-T by hand with the same model: the prompt names the class ("a red toy"), never the subject folder
    model = CLIPModel.from_pretrained(models["clip"]).eval()
    processor = AutoImageProcessor.from_pretrained(models["clip"])
    tokenizer = AutoTokenizer.from_pretrained(models["clip"])
    files = sorted((tmp_path / "same").glob("*.png"))
    with torch.no_grad():
        image = model.get_image_features(pixel_values=processor(images=[Image.open(f) for f in files],
                                                                return_tensors="pt")["pixel_values"]).pooler_output
        texts = [f.stem.split("+")[3] for f in files]
        text = model.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt")).pooler_output
    expected = torch.nn.functional.cosine_similarity(image, text).mean().item()
    assert metrics["clip_t"] == pytest.approx(expected, abs=1e-5)


def test_different_images_score_lower(bench, models, tmp_path):
    out = tmp_path / "other"
    out.mkdir()
    for i in range(2):
        _smooth(i).save(out / f"dog+{i:02d}+0+a dog in the snow.png")
    metrics = _score(bench, out, models, "--subjects", "dog")["metrics"]
    assert -1.0 <= metrics["dino"] < 0.999 and -1.0 <= metrics["clip_i"] < 0.999
    assert -1.0 <= metrics["clip_t"] <= 1.0
    only_dino = _score(bench, out, models, "--subjects", "dog", "--metrics", "dino")["metrics"]
    assert set(only_dino) == {"dino", "dino_all_pairs"} and only_dino["dino"] == pytest.approx(metrics["dino"])


def test_dreambench_bad_inputs_name_the_flag(bench, models, tmp_path):
    _copy_references_as_generated(bench, tmp_path / "gen")
    with pytest.raises(ValueError, match="--clip-model is required"):
        dreambench.main(["--data", str(bench), "--generated", str(tmp_path / "gen"), "--dino-model", models["dino"],
                         "--dino-image-size", "32", "--device", "cpu"])
    with pytest.raises(ValueError, match="--dino-model .*missing.*config.json"):
        _score(bench, tmp_path / "gen", {**models, "dino": str(tmp_path / "missing")})
    (tmp_path / "gen" / "not-an-official-name.png").write_bytes((tmp_path / "gen" / os.listdir(tmp_path / "gen")[0])
                                                                .read_bytes())
    with pytest.raises(ValueError, match="not named <subject>"):
        _score(bench, tmp_path / "gen", models)
    unknown = tmp_path / "unknown-subject"
    shutil.copytree(bench, unknown)
    (unknown / "gizmo").mkdir()
    _noise(5).save(unknown / "gizmo" / "00.jpg")
    with pytest.raises(ValueError, match="'gizmo' has no class noun"):
        dreambench.load_subjects(dreambench.DreamBenchConfig(data=str(unknown), generated=str(tmp_path)))
    for bad_names, message in ((["img+1.jpg"], "'\\+' separates the parts"), (["00.jpg", "00.png"], "share the name '00'")):
        odd = tmp_path / f"odd-{len(bad_names)}"
        shutil.copytree(bench, odd)
        subject = sorted(p for p in odd.iterdir() if p.is_dir())[0]
        for bad_name in bad_names:
            _noise(6).save(subject / bad_name)
        with pytest.raises(ValueError, match=message):
            dreambench.load_subjects(dreambench.DreamBenchConfig(data=str(odd), generated=str(tmp_path)))


def test_dreambench_jobs_prompts_and_subject_settings(bench, tmp_path):
    """Jobs: the Kosmos-G prompt has `<i>` for the subject (with --drop-object false, "<class> <i>"); the
    CLIP-T prompt names the class noun, never the folder name. prompts.json may mark a built-in subject as
    not live; --max-references N keeps the first N references by name."""
    from pathlib import Path

    widget = dreambench.Subject("widget", "toy", ["a {} in the snow", "a red {}"], [Path("widget/00.jpg")])
    jobs = dreambench.build_jobs([widget], drop_object=True)
    assert [(j.input_prompt, j.text_prompt) for j in jobs] == [("<i> in the snow", "a toy in the snow"),
                                                               ("<i>, red", "a red toy")]
    assert dreambench.build_jobs([widget], drop_object=False)[0].input_prompt == "toy <i> in the snow"

    custom = tmp_path / "bench"
    shutil.copytree(bench, custom)
    (custom / "prompts.json").write_text(json.dumps({"subjects": {"dog": {"class": "dog", "live": False},
                                                                  "widget": {"class": "toy", "live": True}}}))
    subjects = {s.name: s for s in dreambench.load_subjects(
        dreambench.DreamBenchConfig(data=str(custom), generated=str(tmp_path), max_references=1))}
    assert subjects["dog"].prompts == dreambench.OBJECT_PROMPTS
    assert subjects["widget"].prompts == dreambench.LIVE_PROMPTS
    assert [r.name for r in subjects["dog"].references] == ["00.jpg"]
    # found by a review: these were bare KeyError / AttributeError tracebacks, a template read letter by letter, a
    # "live": "false" taken as live
    for spec, message in (({"subjects": {"widget": {"live": False}}}, '"subjects" must map each folder'),
                          ({"subjects": ["widget"]}, '"subjects" must map each folder'),
                          ({"subjects": {"widget": {"class": "toy", "live": "false"}}}, '"subjects" must map'),
                          ({"object_prompts": "a {} in snow"}, '"object_prompts" must be a list of prompt templates')):
        (custom / "prompts.json").write_text(json.dumps(spec))
        with pytest.raises(ValueError, match=f"prompts file .*prompts.json: {message}"):
            dreambench.load_subjects(dreambench.DreamBenchConfig(data=str(custom), generated=str(tmp_path)))
    (custom / "prompts.json").write_bytes(b'{"subjects": {"widget": "caf\xe9"}}')
    with pytest.raises(ValueError, match="prompts file .*prompts.json: not valid UTF-8 JSON"):
        dreambench.load_subjects(dreambench.DreamBenchConfig(data=str(custom), generated=str(tmp_path)))


def test_dreambench_per_subject_scores_are_each_subjects_own(bench, models, tmp_path):
    """per_subject averages only that subject's images: copies of the references score 1.0 for `dog`,
    unrelated images score lower for `widget`, and the overall score is the mean over all images."""
    out = tmp_path / "mixed"
    out.mkdir()
    for ref in sorted((bench / "dog").iterdir()):
        Image.open(ref).convert("RGB").save(out / f"dog+{ref.stem}+0+a dog in the snow.png")
    for i, ref in enumerate(sorted((bench / "widget").iterdir())):
        _smooth(i).save(out / f"widget+{ref.stem}+0+a red toy.png")
    result = _score(bench, out, models, "--metrics", "dino")
    dog, widget = result["per_subject"]["dog"], result["per_subject"]["widget"]
    assert dog["images"] == widget["images"] == 2
    assert dog["dino"] == pytest.approx(1.0, abs=1e-5) and widget["dino"] < 0.999
    assert result["metrics"]["dino"] == pytest.approx((dog["dino"] + widget["dino"]) / 2, abs=1e-6)


# ---- FID ---------------------------------------------------------------------------------------------
def test_fid_with_a_transformers_image_model(models, tmp_path):
    real, same, other = tmp_path / "real", tmp_path / "same", tmp_path / "other"
    for folder in (real, same, other):
        folder.mkdir()
    for i in range(12):
        _noise(100 + i).save(real / f"{i}.png")
        _noise(100 + i).save(same / f"{i}.png")
        _smooth(i).save(other / f"{i}.png")
    common = ["--inception", models["image-model"], "--resize", "32", "--crop", "32", "--device", "cpu"]
    identical = fid.main(["--generated", str(same), "--real", str(real), *common])
    different = fid.main(["--generated", str(other), "--real", str(real), *common,
                          "--save-real-stats", str(tmp_path / "real-stats")])  # np.savez adds .npz: reported as written
    assert different["saved_real_stats"] == str(tmp_path / "real-stats.npz")
    assert identical["num_real"] == identical["num_generated"] == 12
    assert abs(identical["fid"]) < 1e-3 * different["fid"]
    assert different["fid"] > 1e-3
    # the saved real statistics give the same FID as the real folder
    reused = fid.main(["--generated", str(other), "--real", different["saved_real_stats"], *common])
    assert reused["fid"] == pytest.approx(different["fid"], rel=1e-9)
    # and the CLI's value is the Fréchet distance of the features, computed by hand here
    from train.eval.images import resize_center_crop

    extractor = InceptionFeatures(models["image-model"], CPU)
    features = {name: extractor([resize_center_crop(Image.open(p).convert("RGB"), 32, 32)
                                 for p in sorted(folder.iterdir())]).double().numpy()
                for name, folder in (("real", real), ("other", other))}
    by_hand = frechet_distance(*gaussian_statistics(features["other"]), *gaussian_statistics(features["real"]))
    assert different["fid"] == pytest.approx(by_hand, rel=1e-6)


def test_fid_follows_linked_folders_keeps_npz_names_and_refuses_one_file_for_two_outputs(models, tmp_path):
    real, generated, elsewhere = tmp_path / "real", tmp_path / "generated", tmp_path / "elsewhere"
    for folder in (real, generated, elsewhere):
        folder.mkdir()
    for i in range(3):
        _noise(i).save(real / f"{i}.png")
        _smooth(i).save(generated / f"{i}.png")
        _smooth(10 + i).save(elsewhere / f"{i}.png")
    (generated / "linked").symlink_to(elsewhere, target_is_directory=True)
    common = ["--inception", models["image-model"], "--resize", "32", "--crop", "32", "--device", "cpu",
              "--generated", str(generated)]
    stats = tmp_path / "real.NPZ"
    result = fid.main([*common, "--real", str(real), "--save-real-stats", str(stats)])
    assert result["num_generated"] == 6  # the linked folder's 3 images count
    assert result["saved_real_stats"] == str(stats) and sorted(p.name for p in tmp_path.glob("real.*")) == ["real.NPZ"]
    assert fid.main([*common, "--real", str(stats)])["fid"] == pytest.approx(result["fid"], rel=1e-9)
    # the same weights under another name are the same network (found by a review: the name was compared)
    renamed = tmp_path / "renamed-model"
    shutil.copytree(models["image-model"], renamed)
    (renamed / ".cache").mkdir()
    (renamed / ".cache" / "download.metadata").write_text("a hub download's timestamped record")  # not counted
    assert fid.main(["--inception", str(renamed), *common[2:], "--real", str(stats)])["fid"] == \
        pytest.approx(result["fid"], rel=1e-9)
    # statistics an earlier version saved name the network by its file's name: accepted for weights of that name
    with np.load(stats) as saved:
        kind, _, *preprocessing = str(saved["extractor"]).split(":")
        earlier = tmp_path / "earlier.npz"
        np.savez(earlier, mu=saved["mu"], sigma=saved["sigma"], count=saved["count"],
                 extractor=np.array(":".join([kind, Path(models["image-model"]).name, *preprocessing])))
    assert fid.main([*common, "--real", str(earlier)])["fid"] == pytest.approx(result["fid"], rel=1e-9)
    # statistics made with another resize/crop are refused by name (they only warned: a meaningless FID)
    with pytest.raises(ValueError, match=r"real\.NPZ was computed with .*:resize32:crop32:.*, this run uses "
                                         r".*:resize40:crop32:.*Compute the real statistics again"):
        fid.main([*common[:2], "--resize", "40", *common[4:], "--real", str(stats)])
    with pytest.raises(ValueError, match="--output-json and --save-real-stats name the same file"):
        fid.main([*common, "--real", str(real), "--save-real-stats", str(stats), "--output-json", str(stats)])
    # a result file naming an input is refused before it is read (a review replaced a checkpoint with --json)
    before = stats.read_bytes()
    with pytest.raises(OutputPathError, match=r"--output-json .*real\.NPZ is the input file .*real\.NPZ; writing "
                                              r"there would destroy it"):
        fid.main([*common, "--real", str(stats), "--output-json", str(stats)])
    assert stats.read_bytes() == before


def test_fid_with_torchvision_inception_weights(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    model = inception_v3(weights=None, aux_logits=True, init_weights=False)  # torchvision's layout, random weights
    weights = tmp_path / "inception.safetensors"
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(weights))
    real, other = tmp_path / "real", tmp_path / "other"
    real.mkdir(), other.mkdir()
    for i in range(3):
        _noise(i).save(real / f"{i}.png")
        _smooth(i).save(other / f"{i}.png")
    extractor = InceptionFeatures(str(tmp_path / "inception.safetensors"), CPU, image_size=75)
    features = extractor([Image.open(p).convert("RGB") for p in sorted(real.iterdir())])
    assert features.shape == (3, 2048) and torch.isfinite(features).all()
    seen = []  # what the network receives: black -> -1, white -> 1 (the Google weights' input range)
    network, extractor.model = extractor.model, lambda x: (seen.append((x.min().item(), x.max().item())),
                                                         torch.zeros(len(x), 2048))[1]
    extractor([Image.new("RGB", (8, 8), (0, 0, 0)), Image.new("RGB", (8, 8), (255, 255, 255))])
    assert seen == [pytest.approx((-1.0, 1.0), abs=1e-5)]
    extractor.model = network
    common = ["--inception", str(tmp_path / "inception.safetensors"), "--image-size", "75", "--resize", "40",
              "--crop", "40", "--device", "cpu"]
    same = fid.main(["--generated", str(real), "--real", str(real), *common])["fid"]
    different = fid.main(["--generated", str(other), "--real", str(real), *common])["fid"]
    assert abs(same) < 1e-3 * different
    save_file({"conv.weight": torch.zeros(2, 2)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="--inception .*not torchvision inception_v3"):
        InceptionFeatures(str(tmp_path / "wrong.safetensors"), CPU)


# ---- generation ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generators(tmp_path_factory):
    """A tiny Kosmos-G pack and a tiny SD1.5 diffusers folder (as in tests/test_cli.py)."""
    from support.tiny_kosmosg import write_tiny_pack
    from support.tiny_sd15 import write_tiny_sd15

    root = tmp_path_factory.mktemp("generators")
    checkpoint = write_tiny_pack(root)[0]
    write_tiny_sd15(root / "tiny-sd15")
    return {"checkpoint": str(checkpoint), "sd_model": str(root / "tiny-sd15")}


def test_dreambench_generates_resumes_and_scores(bench, models, generators, tmp_path):
    generate = ["--checkpoint", generators["checkpoint"], "--sd-model", generators["sd_model"], "--subjects", "dog",
                "--max-references", "1", "--max-prompts", "3", "--num-images", "2", "--steps", "2",
                "--height", "32", "--width", "32"]
    result = _score(bench, tmp_path / "a", models, *generate, "--batch-size", "2")
    names = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert result["generated_this_run"] == 6 and result["num_images"] == 6
    assert names[0] == "dog+00+p00-0+a dog in the jungle.png"  # live subject, class noun in the CLIP-T prompt
    assert {n.split("+")[3] for n in names} == {"a dog in the jungle.png", "a dog in the snow.png",
                                                "a dog on the beach.png"}
    assert Image.open(tmp_path / "a" / names[0]).size == (32, 32)
    assert all(-1.0 <= v <= 1.0 for v in result["metrics"].values())
    again = _score(bench, tmp_path / "a", models, *generate)
    assert again["generated_this_run"] == 0 and again["metrics"] == result["metrics"]  # resumed: nothing redone
    # seeds are per prompt and image, so another batch size gives the same pictures
    _score(bench, tmp_path / "b", models, *generate, "--batch-size", "1", "--metrics", "dino")
    for name in names:
        first, second = Image.open(tmp_path / "a" / name), Image.open(tmp_path / "b" / name)
        assert np.array_equal(np.asarray(first), np.asarray(second))
    images = [np.asarray(Image.open(tmp_path / "a" / n), dtype=np.int16) for n in names]
    assert np.abs(images[0] - images[1]).max() > 0  # image 0 and 1 of a prompt use different seeds
    # a smaller subset scores only its own images, though the folder holds more
    subset = [("2" if a == "3" and generate[i - 1] == "--max-prompts" else a) for i, a in enumerate(generate)]
    assert _score(bench, tmp_path / "a", models, *subset)["num_images"] == 4
    # the folder keeps its images, so a rerun with settings that change them is refused by name
    changed = [("6" if a == "2" and generate[i - 1] == "--steps" else a) for i, a in enumerate(generate)]
    with pytest.raises(ValueError, match=r"other settings \(steps 2 -> 6\)"):
        _score(bench, tmp_path / "a", models, *changed)


def test_generate_coco_follows_the_official_caption_draw(generators, tmp_path):
    annotations = [{"id": 10 + i, "image_id": i, "caption": f"a photo of thing {i}"} for i in range(5)]
    (tmp_path / "captions.json").write_text(json.dumps({"annotations": annotations, "images": []}))
    argv = ["--captions", str(tmp_path / "captions.json"), "--out", str(tmp_path / "out"),
            "--checkpoint", generators["checkpoint"], "--sd-model", generators["sd_model"],
            "--num-captions", "2", "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu"]
    result = coco.main(argv)
    assert result["generated_this_run"] == 2
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["00000.png", "00001.png"]
    manifest = json.loads((tmp_path / "out" / "captions.json").read_text())
    random.seed(0)  # the official script's draw
    expected = random.sample(annotations, 2)
    assert [manifest[f"{i:05d}.png"]["id"] for i in range(2)] == [a["id"] for a in expected]
    with pytest.raises(ValueError, match="--sd-model is required"):
        coco.main(["--captions", str(tmp_path / "captions.json"), "--out", str(tmp_path / "out2"),
                   "--checkpoint", generators["checkpoint"]])
    before = (tmp_path / "out" / "captions.json").read_bytes()
    for extra in (["--num-captions", "3"], ["--seed", "5"]):  # other captions for the images already there
        with pytest.raises(ValueError, match="holds output made with other settings"):
            coco.main(with_flags(argv, *extra))
    assert (tmp_path / "out" / "captions.json").read_bytes() == before


def test_a_folder_records_the_size_its_images_have(generators, tmp_path):
    """--height / --width default to the SD model's own size (None). A folder records the size its images have, so
    one made at that size with the flags (every folder made before the default changed: SD1.5's 512) resumes without
    them, and the other way round: they read as 16 -> None (None -> 16) and were refused. A size that does differ is
    still refused, once the loaded model tells what the default is."""
    (tmp_path / "captions.json").write_text(json.dumps(["a red circle", "a blue square"]))
    argv = ["--captions", str(tmp_path / "captions.json"), "--checkpoint", generators["checkpoint"],
            "--sd-model", generators["sd_model"], "--steps", "2", "--device", "cpu"]
    native = ["--height", "16", "--width", "16"]  # the tiny SD model's own size
    for name, first, rerun in (("asked", native, []), ("default", [], native)):
        out = tmp_path / name
        coco.main(argv + ["--out", str(out)] + first)
        record = json.loads((out / "settings.json").read_text())
        assert (record["height"], record["width"]) == (16, 16)
        assert "scheduler_settings" not in json.dumps(record)  # DDIM samples as before: its folders from before resume
        image = np.asarray(Image.open(out / "00001.png"))
        (out / "00001.png").unlink()  # as if the run was interrupted
        assert coco.main(argv + ["--out", str(out)] + rerun)["generated_this_run"] == 1
        assert np.array_equal(np.asarray(Image.open(out / "00001.png")), image)
    coco.main(argv + ["--out", str(tmp_path / "other"), "--height", "24", "--width", "24"])
    (tmp_path / "other" / "00001.png").unlink()
    with pytest.raises(ValueError, match=r"other settings \(height 24 -> 16; width 24 -> 16\); .* or the settings in"):
        coco.main(argv + ["--out", str(tmp_path / "other")])
    # another scheduler on a DDIM folder (which records no scheduler_settings): the usual message (--scheduler ddim
    # is the fix), not "made by an earlier version"
    with pytest.raises(ValueError, match=r"other settings \(scheduler 'ddim' -> 'dpm'; scheduler_settings.final_sigmas_"
                                         r"type \(not recorded\) -> 'sigma_min'\); a rerun keeps .* or the settings in"):
        coco.main(argv + ["--out", str(tmp_path / "other"), "--height", "24", "--width", "24", "--scheduler", "dpm"])


def test_a_dpm_folder_sampled_before_the_official_final_step_is_refused_by_name(bench, models, generators, tmp_path):
    """generate's DPM-Solver takes the official final step now (kosmosg_core.config.SCHEDULER_SETTINGS): other
    pictures than before. A folder records it, so one sampled before (no record of it) is refused by name with its
    fix, not filled up with the other sampler's pictures; a folder made now resumes."""
    generate = ["--checkpoint", generators["checkpoint"], "--sd-model", generators["sd_model"], "--subjects", "dog",
                "--max-references", "1", "--max-prompts", "1", "--num-images", "1", "--steps", "2", "--metrics", "dino"]
    _score(bench, tmp_path / "out", models, *generate)  # scheduler dpm, the default
    settings = tmp_path / "out" / "settings.json"
    record = json.loads(settings.read_text())
    assert record["scheduler_settings.final_sigmas_type"] == "sigma_min"
    assert _score(bench, tmp_path / "out", models, *with_flags(generate, "--max-prompts", "2"))["generated_this_run"] == 1
    del record["scheduler_settings.final_sigmas_type"]  # as recorded before
    settings.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"other settings \(scheduler_settings.final_sigmas_type \(not recorded\) -> "
                                         r"'sigma_min'\): it was made by an earlier version, which did not record "
                                         r"scheduler_settings.final_sigmas_type, .* use a new output folder, or delete "
                                         r"the folder's contents to make them again"):
        _score(bench, tmp_path / "out", models, *with_flags(generate, "--max-prompts", "3"))
    assert len(list((tmp_path / "out").glob("*.png"))) == 2


@pytest.mark.parametrize("model", ["tiny", "nano"])
def test_generation_defaults_to_the_sd_models_own_size(model, bench, models, generators, tmp_path, caplog):
    """As `python -m kosmosg_core generate`: SD1.5's 512 px, the nano model's 64 (the tiny test model's 16). Both
    commands used to sample at 512 px, where the nano model gives no usable picture, with only a warning.
    --height / --width still win."""
    shipped = os.path.join(REPO, "models", "nano")
    checkpoint, sd_model, native = {
        "tiny": (generators["checkpoint"], generators["sd_model"], 16),
        "nano": (os.path.join(shipped, "kosmosg-nano.safetensors"), os.path.join(shipped, "nano-sd15.safetensors"), 64),
    }[model]
    (tmp_path / "captions.json").write_text(json.dumps(["a red circle on the left, on grey"]))
    coco_argv = ["--captions", str(tmp_path / "captions.json"), "--checkpoint", checkpoint, "--sd-model", sd_model,
                 "--steps", "2", "--device", "cpu"]
    with caplog.at_level("WARNING"):
        coco.main(coco_argv + ["--out", str(tmp_path / "coco")])
        _score(bench, tmp_path / "dreambench", models, "--checkpoint", checkpoint, "--sd-model", sd_model,
               "--subjects", "dog", "--max-references", "1", "--max-prompts", "1", "--num-images", "1",
               "--steps", "2", "--metrics", "dino")
    assert "far from" not in caplog.text
    assert Image.open(tmp_path / "coco" / "00000.png").size == (native, native)
    assert [Image.open(p).size for p in (tmp_path / "dreambench").glob("*.png")] == [(native, native)]
    coco.main(coco_argv + ["--out", str(tmp_path / "coco-asked"), "--height", str(native + 8), "--width", str(native)])
    assert Image.open(tmp_path / "coco-asked" / "00000.png").size == (native, native + 8)


# ---- command line ------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_help(command, capsys):
    argv = ([command] if command else []) + ["--help"]
    try:
        code = eval_main(argv)
    except SystemExit as exit_:  # argparse's --help
        code = exit_.code
    out = capsys.readouterr().out
    assert code == 0
    if command is None:
        assert all(name in out for name in SUBCOMMANDS)
    else:
        assert f"usage: python -m train.eval {command}" in out and "--config" in out
        assert out.count("(default:") >= 5  # every flag documents its default


def test_config_file_and_flag_overrides(tmp_path):
    (tmp_path / "eval.yaml").write_text("steps: 7\nguidance_scale: 2.5\nsubjects: [dog]\n")
    from train.eval.cli import parse_eval_config

    cfg = parse_eval_config(dreambench.DreamBenchConfig, ["--config", str(tmp_path / "eval.yaml"), "--steps", "9"],
                            "dreambench", "")
    assert (cfg.steps, cfg.guidance_scale, cfg.subjects, cfg.num_images) == (9, 2.5, ["dog"], 4)


def test_module_entry_point_errors_and_unknown_commands(tmp_path, capsys):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "train.eval", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})

    missing = run("fid", "--generated", str(tmp_path), "--real", str(tmp_path))
    assert missing.returncode == 2 and "--inception is required" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert eval_main(["no-such"]) == 2 and "unknown sub-command 'no-such'" in capsys.readouterr().err
    assert eval_main([]) == 2 and "sub-commands:" in capsys.readouterr().out  # no command: the usage, exit 2


def test_result_files_are_checked_before_the_evaluation(tmp_path):
    from train.eval.cli import parse_eval_config
    from train.eval.fid import FidConfig
    from train.eval.nano_image import NanoImageConfig

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="--json .* is a folder"):
        parse_eval_config(NanoImageConfig, ["--json", str(tmp_path)], "nano-image", "")
    with pytest.raises(ValueError, match="--grid .*a_file is a file, not a folder"):
        parse_eval_config(NanoImageConfig, ["--grid", str(a_file / "g.png")], "nano-image", "")
    with pytest.raises(ValueError, match="--output-json .* is a folder"):
        parse_eval_config(FidConfig, ["--output-json", str(tmp_path)], "fid", "")


@pytest.mark.parametrize("config_class, name, args, message", [
    (dreambench.DreamBenchConfig, "dreambench", ["--steps", "0"], "--steps 0: must be at least 1"),
    (dreambench.DreamBenchConfig, "dreambench", ["--max-prompts", "-24"], r"--max-prompts -24: must be at least 0 \(0 = all\)"),
    ("fid", "fid", ["--max-images", "-1"], "--max-images -1: must be at least 0"),
    ("fid", "fid", ["--batch-size", "0"], "--batch-size 0: must be at least 1"),
])
def test_counts_and_sizes_are_range_checked(config_class, name, args, message):
    from train.eval.cli import parse_eval_config
    from train.eval.fid import FidConfig

    with pytest.raises(ValueError, match=message):
        parse_eval_config(FidConfig if config_class == "fid" else config_class, args, name, "")


def test_fid_crop_must_fit_the_resize(tmp_path):
    from train.eval import fid as fid_module

    with pytest.raises(ValueError, match="--crop 64 is larger than --resize 32"):
        fid_module.main(["--real", str(tmp_path), "--generated", str(tmp_path), "--resize", "32", "--crop", "64"])


def test_sampling_settings_are_checked_for_api_callers_too():
    from train.eval.generation import SamplingSettings

    with pytest.raises(ValueError, match="height must be a multiple of 8"):
        SamplingSettings(steps=2, guidance_scale=3.0, num_images=1, seed=0, height=60)
