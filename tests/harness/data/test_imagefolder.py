"""Image folders: layouts and labels files, one-line errors naming the file, the standard transforms' geometry,
crops that depend on (seed, epoch, index) alone, and the samplers' batches per rank."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sharpness.harness.data.imagefolder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EpochSampler,
    EvalTransform,
    ImageFolderDataset,
    ImageFolderError,
    ImageList,
    ImageReadError,
    ImageSource,
    ShardSampler,
    TrainTransform,
    _dct_scale,
    load_imagefolder,
    make_loader,
    normalize,
    random_resized_crop_box,
    read_split,
)
from sharpness.harness.loader import epoch_permutation


def _image(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    """A smooth random picture (JPEG-friendly): bilinear upsampling of a 4x3 random one."""
    small = np.random.default_rng(seed).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90) if path.suffix.lower() in (".jpg", ".jpeg") else image.save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """train/<class>/ with 3 classes (created out of order, mixed extensions and cases), val/<class>/."""
    seed = 0
    for split, per_class in (("train", 4), ("val", 2)):
        for cls in ("zebra", "ant", "mole"):
            for i in range(per_class):
                ext = (".jpg", ".JPEG", ".png", ".jpeg")[i % 4]
                _save(_image(seed), tmp_path / split / cls / f"{cls}_{i}{ext}")
                seed += 1
    (tmp_path / "train" / ".cache").mkdir()
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    return tmp_path


def test_class_folders_sorted_and_labelled(folder: Path) -> None:
    train, val = load_imagefolder(folder)
    assert train.classes == ("ant", "mole", "zebra") and val.classes == train.classes
    assert [f.decode() for f in train.files[:4]] == [
        "ant/ant_0.jpg",
        "ant/ant_1.JPEG",
        "ant/ant_2.png",
        "ant/ant_3.jpeg",
    ]
    assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert val.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert train.path(11) == folder / "train" / "zebra" / "zebra_3.jpeg"


def test_val_classes_must_be_training_classes(folder: Path) -> None:
    _save(_image(99), folder / "val" / "yak" / "1.jpg")
    with pytest.raises(ImageFolderError, match="class folders yak are not among the 3 training classes"):
        load_imagefolder(folder)


def test_empty_class_folder_and_missing_split(folder: Path, tmp_path: Path) -> None:
    (folder / "train" / "owl").mkdir()
    with pytest.raises(ImageFolderError, match="owl: class folder without images"):
        read_split(folder, "train")
    with pytest.raises(ImageFolderError, match="no folder 'test'"):
        read_split(folder, "test")


def _flat_val(root: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        _save(_image(50 + i), root / "val" / name)


def test_official_val_with_loc_val_solution_csv(folder: Path) -> None:
    names = ["ILSVRC2012_val_00000002.JPEG", "ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000003.JPEG"]
    for cls in ("zebra", "ant", "mole"):
        for f in (folder / "val" / cls).iterdir():
            f.unlink()
        (folder / "val" / cls).rmdir()
    _flat_val(folder, names)
    (folder / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000003,zebra 1 2 30 20 zebra 3 4 10 10\n"
        "ILSVRC2012_val_00000001,mole 0 0 39 29\n"
        "ILSVRC2012_val_00000002,ant 5 5 20 20\n"
        "ILSVRC2012_val_00000099,ant 5 5 20 20\n"  # an image not in this copy: ignored
    )
    _, val = load_imagefolder(folder)
    assert [f.decode() for f in val.files] == sorted(names)
    assert val.labels.tolist() == [1, 0, 2]
    assert val.classes == ("ant", "mole", "zebra")


def test_official_val_with_val_labels_txt(folder: Path, tmp_path: Path) -> None:
    root = tmp_path / "flat"
    (root / "train").mkdir(parents=True)
    (folder / "train").rename(root / "train")
    _flat_val(root, ["a.JPEG", "b.JPEG", "c.png"])
    (root / "val" / "val_labels.txt").write_text("# filename class\na.JPEG zebra\n\nb.JPEG 1  # an index\nc.png ant\n")
    _, val = load_imagefolder(root)
    assert val.labels.tolist() == [2, 1, 0]
    (root / "val" / "val_labels.txt").write_text("a.JPEG zebra\nb.JPEG 3\nc.png ant\n")
    with pytest.raises(ImageFolderError, match="line 2: class '3' is not a training class folder nor an index below 3"):
        load_imagefolder(root)
    (root / "val" / "val_labels.txt").write_text("a.JPEG zebra\n")
    with pytest.raises(ImageFolderError, match="no label for 2 of the 3 images .* \\(first: b.JPEG, c.png\\)"):
        load_imagefolder(root)
    (root / "val" / "val_labels.txt").unlink()
    with pytest.raises(ImageFolderError, match="flat folder of images without class folders, and no LOC_val_sol"):
        load_imagefolder(root)


def test_corrupt_and_unreadable_images_raise_naming_the_file(folder: Path) -> None:
    train, _ = load_imagefolder(folder)
    buf = io.BytesIO()
    _image(0, (64, 48)).save(buf, "JPEG", quality=90)
    train.path(0).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # truncated JPEG
    train.path(2).write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # broken PNG
    train.path(4).unlink()  # vanished since the listing
    decoders = ["pillow", "simplejpeg"]  # both are installed with the [test] extra
    for decoder in decoders:
        for transform, key in ((TrainTransform(), (0, 0)), (EvalTransform(), 0), (None, 0)):
            ds = ImageFolderDataset(train, transform, decoder=decoder)
            for index in (0, 2, 4):
                k = (key[0], index) if isinstance(key, tuple) else index
                with pytest.raises(ImageReadError, match=f"^{train.path(index)}: cannot read image"):
                    ds[k]


def test_eval_transform_is_resize_then_center_crop(folder: Path) -> None:
    train, _ = load_imagefolder(folder)
    ds = ImageFolderDataset(train, EvalTransform(24, 28))
    x, label = ds[5]
    assert x.dtype == torch.uint8 and x.shape == (3, 24, 24) and label == 1
    image = Image.open(train.path(5)).convert("RGB")  # 40 x 30: shorter side 30 -> 28, longer 40 * 28 / 30
    expected = image.resize((37, 28), Image.Resampling.BILINEAR).crop((6, 2, 30, 26))
    assert torch.equal(x, torch.from_numpy(np.array(expected)).permute(2, 0, 1))
    assert torch.equal(ds[5][0], x)  # deterministic
    assert ImageFolderDataset(train, EvalTransform())[5][0].shape == (3, 224, 224)


def test_train_crops_depend_on_seed_epoch_and_index_only(folder: Path) -> None:
    train, _ = load_imagefolder(folder)
    ds = ImageFolderDataset(train, TrainTransform(16), seed=3)
    first = ds[(2, 7)][0]
    assert first.shape == (3, 16, 16)
    resumed = ImageFolderDataset(train, TrainTransform(16), seed=3)  # as after a restart
    assert torch.equal(resumed[(2, 7)][0], first)
    assert not torch.equal(ds[(3, 7)][0], first)  # another epoch
    assert not torch.equal(ImageFolderDataset(train, TrainTransform(16), seed=4)[(2, 7)][0], first)
    with pytest.raises(TypeError, match="ask for samples by \\(epoch, index\\)"):
        ds[7]


def test_same_crops_with_any_number_of_workers(folder: Path) -> None:
    train, _ = load_imagefolder(folder)
    ds = ImageFolderDataset(train, TrainTransform(16), seed=1)
    sampler = EpochSampler(len(train), 4, seed=1)
    sampler.set_epoch(5)
    batches = {}
    for workers in (0, 2):
        loader = make_loader(ds, sampler, 4, workers=workers, prefetch_factor=1)
        batches[workers] = [(x.clone(), y.clone()) for x, y in loader]
    assert len(batches[0]) == 3
    for (x0, y0), (x2, y2) in zip(batches[0], batches[2], strict=True):
        assert x0.dtype == torch.uint8 and x0.shape == (4, 3, 16, 16)
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_random_resized_crop_box() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(500, 375, rng)
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375
        assert 0.08 * 500 * 375 * 0.97 <= w * h <= 500 * 375
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # No draw fits a 1000 x 10 strip: the central crop with the aspect ratio clamped to 4/3.
    assert random_resized_crop_box(1000, 10, rng) == (493, 0, 13, 10)
    assert random_resized_crop_box(10, 1000, rng) == (0, 493, 10, 13)
    assert random_resized_crop_box(1, 1, rng) == (0, 0, 1, 1)


def test_dct_scaled_decode_keeps_the_crop(tmp_path: Path) -> None:
    assert [_dct_scale(r, 224) for r in (223, 447, 448, 900, 1792, 5000)] == [1, 1, 2, 4, 8, 8]
    path = tmp_path / "big.jpg"
    _save(_image(7, (960, 720)), path)
    with ImageSource(path) as source:
        assert source.decode(4).size == (240, 180)
    rng_key = (0, 0)
    images = ImageList(tmp_path, np.array([b"big.jpg"]), np.array([0]), ("x",))
    scaled = ImageFolderDataset(images, TrainTransform(64, scale=(0.5, 0.5)))[rng_key][0].float()
    full = ImageFolderDataset(images, TrainTransform(64, scale=(0.5, 0.5), dct_scaling=False))[rng_key][0].float()
    assert (scaled - full).abs().mean() < 2.0  # the same crop, decoded at 1/4 scale: pixels differ by rounding


def test_simplejpeg_decodes_the_same_crop(folder: Path) -> None:
    train, _ = load_imagefolder(folder)
    for transform, key in ((TrainTransform(32), (1, 0)), (EvalTransform(24, 28), 0)):
        pil = ImageFolderDataset(train, transform, decoder="pillow")[key][0].float()
        sj = ImageFolderDataset(train, transform, decoder="simplejpeg")[key][0].float()
        assert (pil - sj).abs().max() <= 3  # one libjpeg-turbo, two wrappers: the same crop, rounding apart
    with ImageSource(train.path(0), "simplejpeg") as source:
        assert source._data is not None and source._image is None  # decoded by simplejpeg, not Pillow
    png = ImageFolderDataset(train, EvalTransform(24, 28), decoder="simplejpeg")[2][0]  # falls back to Pillow
    assert torch.equal(png, ImageFolderDataset(train, EvalTransform(24, 28))[2][0])


def test_epoch_sampler_matches_the_in_memory_order_and_splits_batches_over_ranks() -> None:
    n, batch, seed, epoch = 50, 8, 2, 4
    single = EpochSampler(n, batch, seed)
    single.set_epoch(epoch)
    keys = list(single)
    assert len(keys) == len(single) == 6 * 8 and {e for e, _ in keys} == {epoch}
    order = epoch_permutation(n, seed, epoch, torch.device("cpu")).tolist()
    assert [i for _, i in keys] == order[:48]
    ranks = []
    for rank in range(4):
        sampler = EpochSampler(n, batch, seed, rank=rank, world_size=4)
        sampler.set_epoch(epoch)
        assert sampler.local_batch_size == 2
        ranks.append([i for _, i in sampler])
    for b in range(6):  # the ranks' shares of batch b make up the single process's batch b, in order
        assert sum((r[2 * b : 2 * b + 2] for r in ranks), []) == order[8 * b : 8 * b + 8]
    single.set_epoch(epoch, start_batch=4)
    assert [i for _, i in single] == order[32:48]
    with pytest.raises(ValueError, match="positive multiple of world_size"):
        EpochSampler(n, 6, seed, world_size=4)


def test_shard_sampler_covers_every_example_once() -> None:
    shards = [list(ShardSampler(11, rank=r, world_size=3)) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert [len(ShardSampler(11, rank=r, world_size=3)) for r in range(3)] == [4, 4, 3]


def test_normalize() -> None:
    x = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 3, 1, 1)
    expected = [(0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], (1 - IMAGENET_MEAN[1]) / IMAGENET_STD[1]]
    expected.append((128 / 255 - IMAGENET_MEAN[2]) / IMAGENET_STD[2])
    assert torch.allclose(normalize(x).flatten(), torch.tensor(expected), rtol=0, atol=1e-6)
    assert normalize(x).dtype == torch.float32


def test_grayscale_and_cmyk_jpegs_become_rgb(tmp_path: Path) -> None:
    # ImageNet's training set holds both (and a PNG named .JPEG, which Pillow opens by its content).
    for mode in ("L", "CMYK"):
        _save(_image(3, (64, 48)).convert(mode), tmp_path / "train" / mode / "x.JPEG")
    buf = io.BytesIO()
    _image(4, (64, 48)).save(buf, "PNG")
    (tmp_path / "train" / "png").mkdir()
    (tmp_path / "train" / "png" / "x.JPEG").write_bytes(buf.getvalue())
    images = read_split(tmp_path, "train")
    for decoder in ["pillow", "simplejpeg"]:
        for index in range(3):
            x = ImageFolderDataset(images, EvalTransform(24, 28), decoder=decoder)[index][0]
            assert x.shape == (3, 24, 24) and x.dtype == torch.uint8
            gray = images.classes[images.labels[index]] == "L"
            assert not gray or (torch.equal(x[0], x[1]) and torch.equal(x[1], x[2]))
